"""Build a Workflow's DAG from its source, in a build Pod of the Workflow's namespace.

``python -m dagkube.kubernetes.build --key KEY --name NAME`` imports the user's code (a
"module:function" of the image, or inline source; the request is the JSON in
``DAGKUBE_BUILD_REQUEST``), builds the :class:`dagkube.Workflow` and stores it at ``KEY`` in
the Redis of ``DAGKUBE_REDIS_URL`` (the namespace's worker credential) as a data-only
description with its opaque blobs (:mod:`dagkube.description`). Then it writes the outcome to
``KEY:result``: ``{"tasks": N}``, or ``{"reason": ..., "message": ...}`` and exit status 3.

The operator creates the Pod (no service-account token, non-root, read-only root, memory,
CPU, disk and time limits), waits for the outcome, deletes the Pod and reads the description
without unpickling it. User code therefore never runs in the operator, and nothing it writes
is loaded there as code. What the build prints goes to the Pod's log, which the operator reads
(its tail) only when the build fails without an outcome.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import traceback
from typing import Any

FAILED = 3
RESULT_TTL_S = 3600
MESSAGE_LIMIT = 4096
REQUEST_ENV = "DAGKUBE_BUILD_REQUEST"


class BuildError(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _as_workflow(candidate: Any, name: str) -> Any:
    import dagkube

    if isinstance(candidate, dagkube.Workflow):
        return candidate
    try:
        return dagkube.Workflow(candidate, name=name)
    except dagkube.DagkubeError as exc:
        raise BuildError(
            "InvalidWorkflow",
            f"{name} returned {type(candidate).__name__}, not a dagkube.Workflow or task "
            f"nodes: {exc}",
        ) from exc


def from_module(target: str, args: dict[str, Any]) -> Any:
    module_name, _, function_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise BuildError(
            "ModuleNotFound",
            f"spec.source.module.name={target!r}: module {module_name!r} cannot be imported "
            f"({exc}); it must be installed in the worker image (builds run there)",
        ) from exc
    except Exception as exc:
        raise BuildError(
            "ModuleImportFailed",
            f"spec.source.module.name={target!r}: importing {module_name!r} failed: "
            f"{type(exc).__name__}: {exc}",
        ) from exc
    function = getattr(module, function_name, None)
    if not callable(function):
        raise BuildError(
            "FunctionNotFound",
            f"spec.source.module.name={target!r}: module {module_name!r} has no function "
            f"{function_name!r}",
        )
    try:
        candidate = function(**args)
    except TypeError as exc:
        raise BuildError(
            "InvalidArguments",
            f"spec.source.module: calling {target} with args {args!r} failed: {exc}",
        ) from exc
    except Exception as exc:
        raise BuildError(
            "BuildFailed",
            f"spec.source.module: {target}(**args) raised {type(exc).__name__}: {exc}",
        ) from exc
    return _as_workflow(candidate, function_name)


def from_inline(source: str, name: str) -> Any:
    from dagkube.errors import DagkubeError
    from dagkube.loader import load_workflow_file

    with tempfile.TemporaryDirectory(prefix="dagkube-inline-") as folder:
        path = os.path.join(folder, f"{name.replace('-', '_')}.py")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(source)
        try:
            return load_workflow_file(path).workflow
        except DagkubeError as exc:
            message = str(exc).replace(repr(path), "spec.source.inline")
            raise BuildError("InvalidInlineSource", message) from exc


def result_key(key: str) -> str:
    """Where a build writes its outcome (JSON)."""
    return f"{key}:result"


def _cut(message: str) -> str:
    data = message.encode()
    if len(data) <= MESSAGE_LIMIT:
        return message
    half = MESSAGE_LIMIT // 2
    return data[:half].decode(errors="ignore") + " [...] " + data[-half:].decode(errors="ignore")


def build(request: dict[str, Any]) -> Any:
    """The workflow of a request: ``{"module": "pkg.mod:fn", "args": {...}}`` or
    ``{"inline": "...", "name": ...}``; BuildError when it cannot be built."""
    try:
        if request.get("module"):
            return from_module(str(request["module"]), dict(request.get("args") or {}))
        return from_inline(str(request["inline"]), str(request.get("name") or "inline"))
    except BuildError:
        raise
    except SystemExit as exc:  # sys.exit() in a module's build function
        raise BuildError(
            "BuildFailed",
            f"building the workflow called sys.exit({exc.code!r}): the source must return "
            "its workflow, not exit; raise an exception to report a problem",
        ) from None
    except BaseException as exc:
        traceback.print_exc()
        raise BuildError(
            "BuildFailed", f"building the workflow failed: {type(exc).__name__}: {exc}"
        ) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dagkube.kubernetes.build",
        description="Build a Workflow's DAG (the request in $DAGKUBE_BUILD_REQUEST) and store "
        "its description at KEY in the Redis of $DAGKUBE_REDIS_URL.",
    )
    parser.add_argument("--key", required=True, help="Redis key of the description")
    parser.add_argument("--ttl", type=int, default=RESULT_TTL_S, help="seconds the keys live")
    options = parser.parse_args(argv)
    missing = [name for name in ("DAGKUBE_REDIS_URL", REQUEST_ENV) if not os.environ.get(name)]
    if missing:
        parser.error(f"{' and '.join(missing)} not set (the operator's build Pod sets both)")
    import redis

    from dagkube import description

    connection = redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"])
    outcome: dict[str, Any]
    try:
        request = json.loads(os.environ[REQUEST_ENV])
        workflow = build(request)
        with connection.pipeline(transaction=True) as pipe:
            description.store(pipe, options.key, workflow.dag, ttl_s=options.ttl)
            pipe.execute()
        outcome = {"tasks": len(workflow.dag.tasks)}
    except BuildError as exc:
        outcome = {"reason": exc.reason, "message": _cut(str(exc))}
    except Exception as exc:  # describing or storing it: not the user's code
        traceback.print_exc()
        outcome = {
            "reason": "BuildFailed",
            "message": _cut(f"storing the built workflow failed: {type(exc).__name__}: {exc}"),
        }
    connection.set(result_key(options.key), json.dumps(outcome), ex=options.ttl)
    return FAILED if "reason" in outcome else 0


if __name__ == "__main__":
    sys.exit(main())
