"""Control groups for worker processes: a memory limit (the kernel OOM-kills past it) and a CPU
quota (CFS bandwidth), on the cgroup v1 layout (one hierarchy per controller) and on v2 (one
unified hierarchy). Also what the kernel measured: peak memory, OOM kills, CPU time, throttling.

Used by the node agent of the local control plane (a Pod's container limits) and by the local
backend (each worker process under its class's limits). Creating cgroups needs a writable
hierarchy (root, or a delegated subtree); :func:`detect` returns None where there is none.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from dataclasses import dataclass
from pathlib import Path

CPU_PERIOD_US = 100_000
MOUNTINFO = Path("/proc/self/mountinfo")


class CgroupError(RuntimeError):
    """A cgroup could not be created, limited, joined or removed (the message says which)."""


@dataclass(frozen=True)
class Limits:
    """``memory_bytes``: hard limit (None: unlimited); ``cpu_millis``: CPU quota in thousandths
    of a core, e.g. 286 for "286m" (None: unlimited)."""

    memory_bytes: int | None = None
    cpu_millis: int | None = None


@dataclass(frozen=True)
class Usage:
    """What the kernel counted for a cgroup so far."""

    memory_peak_bytes: int | None
    oom_kills: int
    cpu_usage_s: float
    throttled_periods: int
    throttled_s: float


def _mounts(mountinfo: Path = MOUNTINFO) -> tuple[Path | None, dict[str, Path]]:
    """The cgroup2 mount point (if any) and the v1 mount point of each controller."""
    unified: Path | None = None
    v1: dict[str, Path] = {}
    for line in mountinfo.read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, extra = left.split(), right.split()
        if not extra:
            continue
        mount_point = Path(fields[4].replace("\\040", " "))
        if extra[0] == "cgroup2":
            unified = unified or mount_point
        elif extra[0] == "cgroup" and len(extra) >= 3:
            for option in extra[2].split(","):
                if option in ("memory", "cpu", "cpuacct", "pids"):
                    v1.setdefault(option, mount_point)
    return unified, v1


class Hierarchy:
    """Where cgroups are created, and how (``layout`` "v1" or "v2")."""

    def __init__(self, layout: str, roots: dict[str, Path]) -> None:
        self.layout = layout
        self.roots = roots  # v2: {"unified": path}; v1: {controller: path}

    def create(self, path: str, limits: Limits) -> Cgroup:
        """Create (or reuse) the cgroup at ``path`` below the roots, with ``limits``."""
        relative = path.strip("/")
        if not relative:
            raise CgroupError("a cgroup path must not be the root")
        if self.layout == "v2":
            root = self.roots["unified"]
            current = root
            for part in Path(relative).parts:
                _enable_v2_controllers(current)
                current = current / part
                current.mkdir(exist_ok=True)
            group = Cgroup(self, {"unified": current})
        else:
            folders: dict[str, Path] = {}
            for controller in ("memory", "cpu", "cpuacct", "pids"):
                if controller in self.roots:
                    folder = self.roots[controller] / relative
                    folder.mkdir(parents=True, exist_ok=True)
                    folders[controller] = folder
            if "memory" not in folders or "cpu" not in folders:
                raise CgroupError("cgroup v1 needs the memory and cpu controllers mounted")
            group = Cgroup(self, folders)
        group.set_limits(limits)
        return group


def _write(path: Path, value: str) -> None:
    try:
        path.write_text(value)
    except OSError as exc:
        raise CgroupError(f"cannot write {value!r} to {path}: {exc.strerror or exc}") from exc


def _enable_v2_controllers(folder: Path) -> None:
    control = folder / "cgroup.subtree_control"
    enabled = set(control.read_text().split()) if control.exists() else set()
    wanted = [c for c in ("memory", "cpu", "pids") if c not in enabled]
    available = set((folder / "cgroup.controllers").read_text().split())
    for controller in wanted:
        if controller in available:
            _write(control, f"+{controller}")


def _stat(path: Path) -> dict[str, int]:
    values = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition(" ")
            with contextlib.suppress(ValueError):
                values[key] = int(value.strip())
    return values


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class Cgroup:
    """One cgroup (in each v1 hierarchy, or in the unified one)."""

    def __init__(self, hierarchy: Hierarchy, folders: dict[str, Path]) -> None:
        self.hierarchy = hierarchy
        self.folders = folders

    @property
    def v2(self) -> bool:
        return self.hierarchy.layout == "v2"

    def _folder(self, controller: str) -> Path:
        return self.folders["unified"] if self.v2 else self.folders[controller]

    @property
    def procs_files(self) -> list[Path]:
        """The ``cgroup.procs`` files a process writes its pid to, to join this cgroup."""
        return sorted({folder / "cgroup.procs" for folder in self.folders.values()})

    def set_limits(self, limits: Limits) -> None:
        if self.v2:
            folder = self.folders["unified"]
            memory = "max" if limits.memory_bytes is None else str(limits.memory_bytes)
            _write(folder / "memory.max", memory)
            if (folder / "memory.swap.max").exists():
                _write(folder / "memory.swap.max", "0")
            quota = "max" if limits.cpu_millis is None else str(_quota_us(limits.cpu_millis))
            _write(folder / "cpu.max", f"{quota} {CPU_PERIOD_US}")
            return
        memory_folder = self.folders["memory"]
        memory = "-1" if limits.memory_bytes is None else str(limits.memory_bytes)
        _write(memory_folder / "memory.limit_in_bytes", memory)
        with contextlib.suppress(CgroupError):  # no swap accounting: nothing to cap
            if (memory_folder / "memory.memsw.limit_in_bytes").exists():
                _write(memory_folder / "memory.memsw.limit_in_bytes", memory)
        cpu_folder = self.folders["cpu"]
        _write(cpu_folder / "cpu.cfs_period_us", str(CPU_PERIOD_US))
        quota = "-1" if limits.cpu_millis is None else str(_quota_us(limits.cpu_millis))
        _write(cpu_folder / "cpu.cfs_quota_us", quota)

    def wrap(self, argv: list[str]) -> tuple[list[str], dict[str, str]]:
        """A command (and the environment it needs) that joins this cgroup and then execs
        ``argv``: everything the program allocates, from its first byte, is counted here."""
        script = (
            "IFS=:; for f in $DAGKUBE_CGROUP_PROCS; do "
            'echo $$ > "$f" || exit 125; done; '
            'unset IFS DAGKUBE_CGROUP_PROCS; exec "$@"'
        )
        procs = ":".join(str(p) for p in self.procs_files)
        return ["/bin/sh", "-c", script, "sh", *argv], {"DAGKUBE_CGROUP_PROCS": procs}

    def add(self, pid: int) -> None:
        for procs in self.procs_files:
            _write(procs, str(pid))

    def pids(self) -> list[int]:
        found: set[int] = set()
        for procs in self.procs_files:
            with contextlib.suppress(OSError):
                found.update(int(p) for p in procs.read_text().split())
        return sorted(found)

    def usage(self) -> Usage:
        if self.v2:
            folder = self.folders["unified"]
            events = _stat(folder / "memory.events")
            cpu = _stat(folder / "cpu.stat")
            return Usage(
                memory_peak_bytes=_read_int(folder / "memory.peak"),
                oom_kills=events.get("oom_kill", 0),
                cpu_usage_s=cpu.get("usage_usec", 0) / 1e6,
                throttled_periods=cpu.get("nr_throttled", 0),
                throttled_s=cpu.get("throttled_usec", 0) / 1e6,
            )
        memory = self.folders["memory"]
        control = _stat(memory / "memory.oom_control")
        cpu = _stat(self.folders["cpu"] / "cpu.stat")
        usage_ns = (
            _read_int(self.folders["cpuacct"] / "cpuacct.usage")
            if ("cpuacct" in self.folders)
            else None
        )
        return Usage(
            memory_peak_bytes=_read_int(memory / "memory.max_usage_in_bytes"),
            oom_kills=control.get("oom_kill", 0),
            cpu_usage_s=(usage_ns or 0) / 1e9,
            throttled_periods=cpu.get("nr_throttled", 0),
            throttled_s=cpu.get("throttled_time", 0) / 1e9,
        )

    def remove(self, *, timeout_s: float = 5.0) -> None:
        """Kill what still runs inside (descendants included) and remove the cgroup and its
        descendants, deepest first."""
        import signal

        folders: list[Path] = []
        for folder in self.folders.values():
            # os.walk skips what vanishes while it walks (another remover got there first).
            nested = [Path(top) / name for top, names, _ in os.walk(folder) for name in names]
            folders += [*sorted(nested, key=lambda p: len(p.parts), reverse=True), folder]
        deadline = time.monotonic() + timeout_s
        for folder in folders:
            procs = folder / "cgroup.procs"
            while True:
                try:
                    remaining = [int(p) for p in procs.read_text().split()]
                except FileNotFoundError:
                    break
                except OSError as exc:  # ENODEV: another remover is taking it down right now
                    if exc.errno != errno.ENODEV:
                        raise
                    break
                if not remaining:
                    break
                for pid in remaining:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                if time.monotonic() > deadline:
                    raise CgroupError(f"processes {remaining} in {folder} did not exit")
                time.sleep(0.02)
            try:
                folder.rmdir()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise CgroupError(f"cannot remove {folder}: {exc.strerror or exc}") from exc


def _quota_us(cpu_millis: int) -> int:
    # The kernel's minimum quota is 1 ms.
    return max(1000, cpu_millis * CPU_PERIOD_US // 1000)


def detect(mountinfo: Path = MOUNTINFO) -> Hierarchy | None:
    """The writable cgroup hierarchy of this machine (v2 preferred when its memory and cpu
    controllers are usable), or None."""
    unified, v1 = _mounts(mountinfo)
    if unified is not None:
        controllers = unified / "cgroup.controllers"
        available = set(controllers.read_text().split()) if controllers.exists() else set()
        if {"memory", "cpu"} <= available and os.access(unified, os.W_OK):
            return Hierarchy("v2", {"unified": unified})
    if "memory" in v1 and "cpu" in v1 and all(os.access(p, os.W_OK) for p in v1.values()):
        return Hierarchy("v1", v1)
    return None
