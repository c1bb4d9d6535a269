"""LocalBackend: worker processes on this machine (``python -m dagkube.worker``).

Where this machine lets us create cgroups (root, or a delegated cgroup v2 subtree), each worker
runs in a cgroup of its own with its class's memory limit (the kernel OOM-kills it past that,
as it would a Pod's container) and CPU quota (memory / memory-per-CPU cores): local runs then
behave, and are planned, like runs on Kubernetes. Elsewhere workers share the machine freely
and the class is recorded for accounting and planning only.
"""

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

from dagkube.errors import DagkubeError
from dagkube.resources import (
    DEFAULT_MAX_CPU,
    DEFAULT_MEMORY_PER_CPU_MIB,
    cpu_for_memory,
    cpu_millicores,
)
from dagkube.runtime import cgroups
from dagkube.runtime.embedded import make_private_dir, pid_alive
from dagkube.runtime.scaler import WorkerExit, WorkerHandle
from dagkube.store.objects import STORE_URL_ENV, THRESHOLD_ENV, ObjectStore

log = logging.getLogger("dagkube.local")


CGROUP_ROOT = "dagkube"  # below the hierarchy's root: dagkube/<pool>/<worker id>
MIB = 1024 * 1024


def sweep_stale_cgroups(hierarchy: cgroups.Hierarchy) -> int:
    """Remove the cgroups of local pools whose driver process is gone (killed before it could
    clean up); their pool names carry the driver's pid. Returns how many were removed."""
    removed = 0
    root = next(iter(hierarchy.roots.values())) / CGROUP_ROOT
    if not root.is_dir():
        return 0
    for folder in root.iterdir():
        parts = folder.name.split("-")
        if len(parts) < 3 or parts[0] != "local" or not parts[1].isdigit():
            continue
        if pid_alive(int(parts[1])):
            continue
        try:
            hierarchy.create(f"{CGROUP_ROOT}/{folder.name}", cgroups.Limits()).remove()
            removed += 1
        except (cgroups.CgroupError, OSError) as exc:  # e.g. still busy: the next sweep retries
            log.debug("cannot remove stale cgroup %s: %s", folder, exc)
    return removed


# Worker logs (one file per worker, under $DAGKUBE_HOME/logs) are pruned, oldest first, to
# these bounds whenever a local runtime starts; a log written in the last hour is kept.
LOG_BUDGET_BYTES = 256 * 1024 * 1024
LOG_BUDGET_FILES = 2000
LOG_KEEP_RECENT_S = 3600.0


def prune_logs(
    log_dir: Path,
    *,
    budget_bytes: int = LOG_BUDGET_BYTES,
    budget_files: int = LOG_BUDGET_FILES,
    keep_recent_s: float = LOG_KEEP_RECENT_S,
) -> int:
    """Delete the oldest worker logs beyond the budgets; returns how many were deleted."""
    logs = []
    for path in log_dir.glob("*.log"):
        try:
            stat = path.stat()
        except FileNotFoundError:  # another runtime pruned it meanwhile
            continue
        logs.append((stat.st_mtime, stat.st_size, path))
    logs.sort(reverse=True)  # newest first
    recent_before = time.time() - keep_recent_s
    total, deleted = 0, 0
    for count, (mtime, size, path) in enumerate(logs, start=1):
        total += size
        if (total > budget_bytes or count > budget_files) and mtime < recent_before:
            try:
                path.unlink()
                deleted += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("cannot delete the old worker log %s: %s", path, exc)
    return deleted


def default_max_workers() -> int:
    """One worker per core (at least 2): local workers run one task at a time."""
    return max(2, os.cpu_count() or 2)


class LocalBackend:
    """Spawns worker processes; their logs go to ``log_dir``.

    ``enforce``: run each worker under its class's memory limit and CPU quota. None (the
    default): where cgroups are writable; True: required (an error where they are not);
    False: never. ``enforced`` says what was decided, ``note`` why not when it is not.
    """

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
        enforce: bool | None = None,
        object_store: ObjectStore | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.object_store = object_store  # the workers' (their environment names it)
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
        self._groups: dict[str, cgroups.Cgroup] = {}
        self.hierarchy: cgroups.Hierarchy | None = None
        self.note = ""
        if enforce is False:
            self.note = "memory and CPU limits not enforced (switched off)"
        else:
            self.hierarchy = cgroups.detect()
            if self.hierarchy is None:
                self.note = (
                    "memory and CPU limits not enforced: no writable cgroup hierarchy here "
                    "(run as root, or in a delegated cgroup v2 subtree)"
                )
                if enforce:
                    raise DagkubeError(
                        f"Resource enforcement was required but is not possible: {self.note}"
                    )
            else:
                sweep_stale_cgroups(self.hierarchy)
        self.enforce_required = bool(enforce)
        make_private_dir(log_dir)
        pruned = prune_logs(log_dir, budget_bytes=LOG_BUDGET_BYTES, budget_files=LOG_BUDGET_FILES)
        if pruned:
            log.info("deleted %d old worker logs in %s", pruned, log_dir)

    @property
    def enforced(self) -> bool:
        """Workers run under their class's memory limit and CPU quota."""
        return self.hierarchy is not None

    def _cgroup(self, worker_id: str, memory_mib: int) -> cgroups.Cgroup | None:
        if self.hierarchy is None:
            return None
        limits = cgroups.Limits(
            memory_bytes=memory_mib * MIB,
            cpu_millis=cpu_millicores(memory_mib, self.memory_per_cpu_mib, self.max_cpu),
        )
        try:
            return self.hierarchy.create(f"{CGROUP_ROOT}/{self.pool}/{worker_id}", limits)
        except (cgroups.CgroupError, OSError) as exc:
            if self.enforce_required:
                raise DagkubeError(f"Cannot limit worker {worker_id}: {exc}") from exc
            self.hierarchy = None
            self.note = f"memory and CPU limits not enforced: {exc}"
            log.warning("%s", self.note)
            return None

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
        env.pop(STORE_URL_ENV, None)  # the runtime's choice, not an inherited one
        if self.object_store is not None:
            env[STORE_URL_ENV] = self.object_store.url
            env[THRESHOLD_ENV] = str(self.object_store.threshold_bytes)
        if self.startup_delay_s > 0:
            env["DAGKUBE_STARTUP_DELAY_S"] = str(self.startup_delay_s)
        if prewarm_for:
            env["DAGKUBE_PREWARM_RUN"] = prewarm_for
        elif demand_for:
            env["DAGKUBE_DEMAND_RUN"] = demand_for
        group = await asyncio.to_thread(self._cgroup, worker_id, memory_mib)
        if group is not None:
            command, joining = group.wrap(command)
            env.update(joining)
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
        if group is not None:
            self._groups[worker_id] = group
        self.spawned_ids.append(worker_id)
        log.debug("spawned worker %s (pid %d)", worker_id, proc.pid)
        return handle

    def alive(self) -> list[WorkerHandle]:
        return [handle for proc, handle in self._procs.values() if proc.returncode is None]

    async def reap(self) -> list[WorkerExit]:
        exited: list[WorkerExit] = []
        for worker_id, (proc, handle) in list(self._procs.items()):
            code = proc.poll()
            if code is not None:
                del self._procs[worker_id]
                oom, peak = await asyncio.to_thread(self._release, worker_id)
                exited.append(WorkerExit(handle, code, oom_killed=oom, peak_memory_bytes=peak))
                if code not in (0, None) and worker_id not in self._terminated:
                    log.warning(
                        "worker %s %s (code %s; log: %s)",
                        worker_id,
                        f"was OOM-killed at its {handle.memory_mib} MiB limit" if oom else "exited",
                        code,
                        self.log_dir / f"{worker_id}.log",
                    )
        return exited

    def _release(self, worker_id: str) -> tuple[bool, int | None]:
        """What the kernel measured for an exited worker's cgroup (OOM-killed? peak memory),
        then the cgroup removed (with anything the worker left running in it)."""
        group = self._groups.pop(worker_id, None)
        if group is None:
            return False, None
        try:
            usage = group.usage()
        except OSError:
            usage = None
        try:
            group.remove()
        except (cgroups.CgroupError, OSError) as exc:
            log.warning("worker %s: cannot remove its cgroup: %s", worker_id, exc)
        if usage is None:
            return False, None
        return usage.oom_kills > 0, usage.memory_peak_bytes

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
        if self.hierarchy is not None:
            await asyncio.to_thread(self._remove_pool_cgroup)

    def _remove_pool_cgroup(self) -> None:
        """The pool's cgroup and every worker's in it (reaped or not)."""
        self._groups.clear()
        assert self.hierarchy is not None
        pool = next(iter(self.hierarchy.roots.values())) / CGROUP_ROOT / self.pool
        if not pool.exists():
            return
        try:
            self.hierarchy.create(f"{CGROUP_ROOT}/{self.pool}", cgroups.Limits()).remove()
        except (cgroups.CgroupError, OSError) as exc:
            log.warning("cannot remove the cgroups of pool %s: %s", self.pool, exc)
