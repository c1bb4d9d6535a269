"""Build a Workflow's DAG from its source, in a child process of the operator.

``python -m dagkube_operator.build REQUEST.json OUT.pickle`` imports the user's code (a
"module:function" of the image, or inline source), builds the :class:`dagkube.Workflow` and
writes its DagSpec (constants included) to ``OUT.pickle``. User code runs here, never in the
operator: an import that crashes, prints, hangs or leaks cannot take the operator down (the
operator kills a build that outlives its timeout, with every process it started). A failure
exits with status 3 and writes ``{"reason": ..., "message": ...}`` to ``failure.json`` next to
``OUT.pickle`` (not to stderr, which is the user's: what it prints cannot pass for a report).
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import sys
import tempfile
import traceback
from typing import Any

from dagkube_operator.reasons import bounded

FAILED = 3


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
            f"({exc}); it must be installed in the worker and operator images",
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


def failure_path(out_path: str) -> str:
    """Where a failed build writes its report."""
    return os.path.join(os.path.dirname(out_path), "failure.json")


def _report(out_path: str, reason: str, message: str) -> int:
    with open(failure_path(out_path), "w", encoding="utf-8") as handle:
        json.dump({"reason": reason, "message": bounded(message)}, handle)
    return FAILED


def main(argv: list[str]) -> int:
    request_path, out_path = argv
    with open(request_path, encoding="utf-8") as handle:
        request = json.load(handle)
    try:
        if request.get("module"):
            workflow = from_module(request["module"], request.get("args") or {})
        else:
            workflow = from_inline(request["inline"], request.get("name") or "inline")
        blob = pickle.dumps(workflow.dag, protocol=pickle.HIGHEST_PROTOCOL)
    except BuildError as exc:
        return _report(out_path, exc.reason, str(exc))
    except SystemExit as exc:  # sys.exit() in a module's build function
        return _report(
            out_path,
            "BuildFailed",
            f"building the workflow called sys.exit({exc.code!r}): the source must return "
            "its workflow, not exit; raise an exception to report a problem",
        )
    except BaseException as exc:
        traceback.print_exc()
        return _report(
            out_path, "BuildFailed", f"building the workflow failed: {type(exc).__name__}: {exc}"
        )
    with open(out_path, "wb") as handle:
        handle.write(blob)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
