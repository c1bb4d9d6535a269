"""Become a container, then exec its command: ``python -m localcluster.enter SPEC.json``.

Started by the node agent as root, in this order: join the container's cgroups (so everything
after is counted and limited), enter a private mount namespace and mount the Pod's volumes
(service-account token, Secrets, ConfigMaps, emptyDirs) and its ``/etc/hosts`` and
``/etc/resolv.conf``, make the root filesystem read-only if the container asks for it, join the
Pod's network namespace, drop to the container's user and groups, change to its working
directory and exec the command with its environment. Any failure before the exec exits 127
with one line on stderr (the agent reports it as the container's start error).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys
from pathlib import Path

CLONE_NEWNS = 0x00020000
CLONE_NEWNET = 0x40000000
CLONE_NEWUTS = 0x04000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode(),
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source} on {target}",
    )


def _ensure(target: Path, directory: bool) -> None:
    if target.exists():
        return
    if directory:
        target.mkdir(parents=True, exist_ok=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()


def become(spec: dict) -> None:
    pid = os.getpid()
    for procs in spec.get("cgroup_procs") or []:
        Path(procs).write_text(str(pid))
    _check(_libc.unshare(CLONE_NEWNS | CLONE_NEWUTS), "unshare(CLONE_NEWNS|CLONE_NEWUTS)")
    hostname = (spec.get("hostname") or "").encode()
    if hostname:
        _check(_libc.sethostname(hostname, len(hostname)), "sethostname")
    _mount("none", "/", None, MS_REC | MS_PRIVATE)
    # Sources are opened before anything is mounted: a volume mounted over /tmp must not hide
    # the sources of later mounts that live under /tmp (the Pod's own folder may).
    mounts = spec.get("mounts") or []
    sources = {
        index: os.open(mount["source"], os.O_PATH | os.O_CLOEXEC)
        for index, mount in enumerate(mounts)
        if not mount.get("tmpfs")
    }
    kinds = {index: Path(mounts[index]["source"]).is_dir() for index in sources}
    for index, mount in enumerate(mounts):
        target = Path(mount["target"])
        if mount.get("tmpfs"):
            _ensure(target, True)
            _mount("tmpfs", str(target), "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
            continue
        _ensure(target, kinds[index])
        _mount(f"/proc/self/fd/{sources[index]}", str(target), None, MS_BIND | MS_REC)
        if mount.get("readonly"):
            _mount("none", str(target), None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    for fd in sources.values():
        os.close(fd)
    if spec.get("read_only_root"):
        _mount("none", "/", None, MS_REMOUNT | MS_BIND | MS_RDONLY)
    netns = spec.get("netns")
    if netns:
        fd = os.open(netns, os.O_RDONLY)
        try:
            _check(_libc.setns(fd, CLONE_NEWNET), f"setns({netns})")
        finally:
            os.close(fd)
    gid, uid = spec.get("gid"), spec.get("uid")
    if gid is not None or uid is not None:
        os.setgroups([int(g) for g in spec.get("groups") or []])
        if gid is not None:
            os.setgid(int(gid))
        if uid is not None:
            os.setuid(int(uid))
    os.chdir(spec.get("cwd") or "/")


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    argv = spec["argv"]
    try:
        become(spec)
        os.execvpe(argv[0], argv, spec["env"])
    except OSError as exc:
        print(f"container start failed: {exc}", file=sys.stderr, flush=True)
        os._exit(127)


if __name__ == "__main__":
    main()
