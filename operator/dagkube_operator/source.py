"""A Workflow's DAG from its ``spec.source``: built in a child process, or read from Redis."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from dagkube.dag import DagSpec
from dagkube.errors import InvalidWorkflow
from dagkube.runtime.keys import stored_dag, stored_dag_constants
from dagkube_operator.reasons import (
    BUILD_REASONS,
    MESSAGE_LIMIT_BYTES,
    Reason,
    bounded,
    reason_of,
)
from dagkube_operator.spec import Source, SpecError

log = logging.getLogger("dagkube.operator")

STDERR_TAIL_BYTES = 64 * 1024  # of a build's stderr, only the last this many are kept
PIPE_GRACE_S = 1.0  # a build that ended gets this long for its last output to arrive


class _BuildOutput(asyncio.SubprocessProtocol):
    """The build child's stderr, of which only the tail is kept (however much it writes), and
    the moments the child exits and its stderr closes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.tail = bytearray()
        self.total_bytes = 0
        self.exited: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[None] = loop.create_future()

    def pipe_data_received(self, fd: int, data: bytes | str) -> None:
        chunk = data.encode() if isinstance(data, str) else data
        self.total_bytes += len(chunk)
        self.tail += chunk
        if len(self.tail) > STDERR_TAIL_BYTES:
            del self.tail[: len(self.tail) - STDERR_TAIL_BYTES]

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)

    def process_exited(self) -> None:
        if not self.exited.done():
            self.exited.set_result(None)

    def stderr_text(self) -> str:
        text = self.tail.decode(errors="replace")
        if self.total_bytes > len(self.tail):
            text = f"[first {self.total_bytes - len(self.tail)} bytes of stderr dropped] {text}"
        return text


def _kill_group(pid: int) -> None:
    """SIGKILL the build's session (it leads its own): the child and whatever it started."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:  # every process of the group has ended already
        return
    except PermissionError as exc:  # the pid went to a process of someone else
        log.warning("cannot kill the build's process group %d: %s", pid, exc)


async def build_dag(
    source: Source, *, name: str, timeout_s: float, cwd: str | None = None
) -> DagSpec:
    """Run ``python -m dagkube_operator.build`` for a module or inline source; a SpecError
    carries the child's reason and message (unknown module, no workflow defined, ...).

    The child leads a session of its own; when it ends, or its time is up, the whole session
    is killed, so a process it left behind (holding its stderr open) cannot keep the
    operator waiting. Its stderr is read as it comes, keeping the last 64 KiB."""
    request: dict[str, Any] = {"name": name}
    if source.module:
        request.update(module=source.module, args=source.args)
    else:
        request["inline"] = source.inline
    loop = asyncio.get_running_loop()
    with tempfile.TemporaryDirectory(prefix="dagkube-build-") as folder:
        request_path = Path(folder, "request.json")
        out_path = Path(folder, "dag.pickle")
        request_path.write_text(json.dumps(request), encoding="utf-8")
        transport, output = await loop.subprocess_exec(
            lambda: _BuildOutput(loop),
            sys.executable,
            "-m",
            "dagkube_operator.build",
            str(request_path),
            str(out_path),
            cwd=cwd,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            done, _ = await asyncio.wait({output.exited}, timeout=timeout_s)
            if done:
                await asyncio.wait({output.closed}, timeout=PIPE_GRACE_S)
        finally:  # also when cancelled (the Workflow deleted, the operator stopping)
            _kill_group(transport.get_pid())
            # Reaped by asyncio's child watcher (at once: SIGKILL) before the pipe is closed.
            await asyncio.wait({output.exited}, timeout=PIPE_GRACE_S)
            transport.close()
        if not done:
            raise SpecError(
                f"building the workflow from spec.source.{source.kind} took longer than "
                f"{timeout_s:g}s (the import or the build function does not return); "
                "the build and every process it started were killed",
                reason=Reason.BUILD_TIMEOUT,
            )
        code = transport.get_returncode()
        if code == 0 and out_path.exists():
            return await asyncio.to_thread(DagSpec.from_bytes, out_path.read_bytes())
        raise _build_failure(Path(folder, "failure.json"), output.stderr_text(), code)


def _build_failure(report: Path, stderr: str, code: int | None) -> SpecError:
    """The failure the child reported (its reason only from BUILD_REASONS), else one made of
    its exit code and the tail of its stderr."""
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        found = json.loads(report.read_text(encoding="utf-8")[: 2 * MESSAGE_LIMIT_BYTES])
        reason = reason_of(found["reason"], Reason.BUILD_FAILED)
        return SpecError(
            bounded(str(found["message"])),
            reason=reason if reason in BUILD_REASONS else Reason.BUILD_FAILED,
        )
    tail = stderr.strip()
    what = (
        "exited with status 0 without writing its DAG (did the source call os._exit()?)"
        if code == 0
        else f"failed (exit code {code})"
    )
    return SpecError(
        bounded(f"building the workflow {what}" + (f": {tail}" if tail else "")),
        reason=Reason.BUILD_FAILED,
    )


async def load_stored_dag(redis: Any, source: Source) -> DagSpec:
    """A DAG ``Workflow.submit`` stored (its body and its large constants)."""
    assert source.dag is not None
    key = source.redis_key or stored_dag(source.dag)
    kind = (await redis.type(key)).decode()
    if kind not in ("string", "none"):
        raise SpecError(
            f"spec.source.ref: Redis key {key!r} holds a {kind}, not a stored DAG (a string "
            "Workflow.submit() writes); name the key submit() printed, or submit again",
            reason=Reason.DAG_NOT_FOUND,
        )
    blob = await redis.get(key)
    if blob is None:
        raise SpecError(
            f"spec.source.ref.dag={source.dag!r}: no stored DAG at Redis key {key!r} (it "
            "expires a while after it was submitted; submit the workflow again)",
            reason=Reason.DAG_NOT_FOUND,
        )
    try:
        dag = await asyncio.to_thread(DagSpec.from_bytes, blob)
    except (pickle.UnpicklingError, InvalidWorkflow, ValueError, EOFError, AttributeError) as exc:
        raise SpecError(
            f"spec.source.ref.dag={source.dag!r}: the stored DAG cannot be read: {exc}",
            reason=Reason.DAG_NOT_FOUND,
        ) from exc
    constants = await redis.hgetall(stored_dag_constants(key))
    dag.constants = {k.decode(): v for k, v in constants.items()}
    return dag
