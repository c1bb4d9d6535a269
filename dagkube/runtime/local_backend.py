"""LocalBackend: worker processes on this machine (``python -m dagkube.worker``)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB, cpu_for_memory
from dagkube.runtime.scaler import WorkerHandle

log = logging.getLogger("dagkube.local")


def default_max_workers() -> int:
    """One worker per core (at least 2): local workers run one task at a time."""
    return max(2, os.cpu_count() or 2)


class LocalBackend:
    """Spawns worker processes; their logs go to ``log_dir``. Memory is not enforced locally:
    the class is recorded for accounting and planning."""

    def __init__(
        self,
        redis_url: str,
        pool: str,
        log_dir: Path,
        *,
        max_workers: int | None = None,
        idle_timeout_s: float = 30.0,
        memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
        max_cpu: float = DEFAULT_MAX_CPU,
        startup_delay_s: float = 0.0,
    ) -> None:
        self.redis_url = redis_url
        self.pool = pool
        self.log_dir = log_dir
        self.max_workers = max_workers or default_max_workers()
        self.idle_timeout_s = idle_timeout_s
        self.memory_per_cpu_mib = memory_per_cpu_mib
        self.max_cpu = max_cpu
        self.startup_delay_s = startup_delay_s
        self._procs: dict[str, tuple[subprocess.Popen, WorkerHandle]] = {}
        self._counter = itertools.count()
        self._tag = secrets.token_hex(3)
        self.spawned_ids: list[str] = []
        self._terminated: set[str] = set()
        log_dir.mkdir(parents=True, exist_ok=True)

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        worker_id = f"{self.pool}-{memory_mib}-{self._tag}{next(self._counter)}"
        spawned_at = time.time()
        env = dict(os.environ)
        env.update(
            DAGKUBE_REDIS_URL=self.redis_url,
            DAGKUBE_SPAWNED_AT=repr(spawned_at),
            DAGKUBE_PARENT_PID=str(os.getpid()),
            # Anything the driver can import, the worker can import (functions pickled by
            # reference, e.g. from the examples' helper modules).
            PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
        )
        command = [
            sys.executable,
            "-m",
            "dagkube.worker",
            "--pool",
            self.pool,
            "--memory-mib",
            str(memory_mib),
            "--worker-id",
            worker_id,
            "--cpu",
            f"{cpu_for_memory(memory_mib, self.memory_per_cpu_mib, self.max_cpu):.4f}",
            "--idle-timeout",
            str(self.idle_timeout_s),
        ]
        # Size native thread pools (BLAS, OpenMP) to the worker's CPU allocation, as a Pod's
        # CPU limit would, unless the user chose otherwise.
        threads = str(
            max(1, int(cpu_for_memory(memory_mib, self.memory_per_cpu_mib, self.max_cpu)))
        )
        for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(variable, threads)
        if self.startup_delay_s > 0:
            env["DAGKUBE_STARTUP_DELAY_S"] = str(self.startup_delay_s)
        if prewarm_for:
            env["DAGKUBE_PREWARM_RUN"] = prewarm_for
        elif demand_for:
            env["DAGKUBE_DEMAND_RUN"] = demand_for
        log_file = open(self.log_dir / f"{worker_id}.log", "ab")  # noqa: SIM115 (child owns it)
        try:
            proc = subprocess.Popen(
                command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C goes to the driver, which stops workers itself
            )
        finally:
            log_file.close()
        handle = WorkerHandle(worker_id, memory_mib, spawned_at)
        self._procs[worker_id] = (proc, handle)
        self.spawned_ids.append(worker_id)
        log.debug("spawned worker %s (pid %d)", worker_id, proc.pid)
        return handle

    def alive(self) -> list[WorkerHandle]:
        return [handle for proc, handle in self._procs.values() if proc.returncode is None]

    async def reap(self) -> list[tuple[WorkerHandle, int | None]]:
        exited: list[tuple[WorkerHandle, int | None]] = []
        for worker_id, (proc, handle) in list(self._procs.items()):
            code = proc.poll()
            if code is not None:
                del self._procs[worker_id]
                exited.append((handle, code))
                if code not in (0, None) and worker_id not in self._terminated:
                    log.warning(
                        "worker %s exited with code %s (log: %s)",
                        worker_id,
                        code,
                        self.log_dir / f"{worker_id}.log",
                    )
        return exited

    async def discard(self, worker_id: str) -> None:
        entry = self._procs.get(worker_id)
        if entry is not None and entry[0].poll() is None:
            with contextlib.suppress(ProcessLookupError):
                entry[0].kill()

    def pids(self) -> dict[str, int]:
        return {wid: proc.pid for wid, (proc, _) in self._procs.items() if proc.poll() is None}

    async def stop_all(self, timeout_s: float = 5.0) -> None:
        """SIGTERM every worker, wait for them, SIGKILL stragglers."""
        for worker_id, (proc, _) in self._procs.items():
            if proc.poll() is None:
                self._terminated.add(worker_id)  # its exit code is expected, not a failure
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while any(p.poll() is None for p, _ in self._procs.values()):
            if time.monotonic() > deadline:
                for proc, _ in self._procs.values():
                    if proc.poll() is None:
                        with contextlib.suppress(ProcessLookupError):
                            proc.kill()
                        proc.wait()
                break
            await asyncio.sleep(0.02)
