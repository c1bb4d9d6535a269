"""A Workflow's DAG from its ``spec.source``: built in a child process, or read from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import sys
import tempfile
from pathlib import Path
from typing import Any

from dagkube.dag import DagSpec
from dagkube.errors import InvalidWorkflow
from dagkube.runtime.keys import stored_dag, stored_dag_constants
from dagkube_operator.spec import Source, SpecError

_STDERR_LIMIT = 4000


async def build_dag(
    source: Source, *, name: str, timeout_s: float, cwd: str | None = None
) -> DagSpec:
    """Run ``python -m dagkube_operator.build`` for a module or inline source; a SpecError
    carries the child's reason and message (unknown module, no workflow defined, ...)."""
    request: dict[str, Any] = {"name": name}
    if source.module:
        request.update(module=source.module, args=source.args)
    else:
        request["inline"] = source.inline
    with tempfile.TemporaryDirectory(prefix="dagkube-build-") as folder:
        request_path = Path(folder, "request.json")
        out_path = Path(folder, "dag.pickle")
        request_path.write_text(json.dumps(request), encoding="utf-8")
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dagkube_operator.build",
            str(request_path),
            str(out_path),
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            _, stderr = await asyncio.wait_for(process.communicate(), timeout_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise SpecError(
                f"building the workflow from spec.source.{source.kind} took longer than "
                f"{timeout_s:g}s (the import or the build function does not return)",
                reason="BuildTimeout",
            ) from None
        except asyncio.CancelledError:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await process.wait()
            raise
        if process.returncode != 0:
            raise _build_failure(stderr.decode(errors="replace"), process.returncode)
        return DagSpec.from_bytes(out_path.read_bytes())


def _build_failure(stderr: str, code: int | None) -> SpecError:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    if lines:
        with contextlib.suppress(ValueError, TypeError, KeyError):
            found = json.loads(lines[-1])
            return SpecError(found["message"], reason=found["reason"])
    tail = stderr.strip()[-_STDERR_LIMIT:]
    return SpecError(
        f"building the workflow failed (exit code {code})" + (f": {tail}" if tail else ""),
        reason="BuildFailed",
    )


async def load_stored_dag(redis: Any, source: Source) -> DagSpec:
    """A DAG ``Workflow.submit`` stored (its body and its large constants)."""
    assert source.dag is not None
    key = source.redis_key or stored_dag(source.dag)
    blob = await redis.get(key)
    if blob is None:
        raise SpecError(
            f"spec.source.ref.dag={source.dag!r}: no stored DAG at Redis key {key!r} (it "
            "expires a while after it was submitted; submit the workflow again)",
            reason="DagNotFound",
        )
    try:
        dag = DagSpec.from_bytes(blob)
    except (pickle.UnpicklingError, InvalidWorkflow, ValueError, EOFError, AttributeError) as exc:
        raise SpecError(
            f"spec.source.ref.dag={source.dag!r}: the stored DAG cannot be read: {exc}",
            reason="DagNotFound",
        ) from exc
    constants = await redis.hgetall(stored_dag_constants(key))
    dag.constants = {k.decode(): v for k, v in constants.items()}
    return dag
