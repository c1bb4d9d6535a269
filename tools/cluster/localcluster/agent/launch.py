"""One container's process: what it is started with, worked out from the Pod before it exists
(the user and groups, the mounts, the cgroup limits, the Pod's ``/etc/hosts`` and
``/etc/resolv.conf``, the launch spec that :mod:`localcluster.enter` reads), starting it through
enter.py, and killing what is left of it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from dagkube.runtime.cgroups import Cgroup, Limits
from localcluster import images
from localcluster.agent import volumes
from localcluster.agent.quantity import cpu_millis, memory_bytes
from localcluster.config import ClusterConfig

ENTER = Path(__file__).resolve().parent.parent / "enter.py"
IMAGE_USERS = {"dagkube": 10001}  # the USER of the project's Dockerfiles


@dataclass(frozen=True)
class Security:
    """What the Pod's and the container's ``securityContext`` ask of the container's process
    (the container's fields win). ``gid`` is ``runAsGroup``, or the uid when there is none."""

    uid: int | None
    gid: int | None
    groups: list[int]
    read_only_root: bool


def container_security(spec: dict, container: dict, image: images.Image, pod: str) -> Security:
    """The container's user and groups; ``pod`` (``namespace/name``) names it in the error."""
    pod_security = spec.get("securityContext") or {}
    security = {**pod_security, **(container.get("securityContext") or {})}
    image_user = next((uid for key, uid in IMAGE_USERS.items() if key in image.name), None)
    uid = security.get("runAsUser", image_user)
    gid = security.get("runAsGroup", uid)
    if security.get("runAsNonRoot") and not uid:
        raise volumes.ConfigError(
            "container has runAsNonRoot and image will run as root "
            f"(pod: {pod}, container: {container['name']})"
        )
    groups = [*(pod_security.get("supplementalGroups") or [])]
    if pod_security.get("fsGroup") is not None:
        groups.append(pod_security["fsGroup"])
    return Security(uid, gid, groups, bool(security.get("readOnlyRootFilesystem")))


def container_mounts(
    container: dict, image: images.Image, pod_mounts: dict[str, Path], pod_folder: Path
) -> list[dict]:
    """The image's own files, the container's volumeMounts (a ``subPath`` is created in its
    volume) and the Pod's ``/etc/hosts`` and ``/etc/resolv.conf``, in mount order."""
    mounts = [
        {"source": str(source), "target": target, "readonly": True}
        for target, source in image.files.items()
    ]
    for mount in container.get("volumeMounts") or []:
        source = pod_mounts.get(mount["name"])
        if source is None:
            raise volumes.ConfigError(f"volume {mount['name']!r} is not a volume of the Pod")
        if mount.get("subPath"):
            source = source / mount["subPath"]
            source.mkdir(parents=True, exist_ok=True)
        mounts.append(
            {
                "source": str(source),
                "target": mount["mountPath"],
                "readonly": bool(mount.get("readOnly")),
            }
        )
    mounts.append({"source": str(pod_folder / "hosts"), "target": "/etc/hosts"})
    mounts.append({"source": str(pod_folder / "resolv.conf"), "target": "/etc/resolv.conf"})
    return mounts


def container_limits(container: dict) -> Limits:
    """The cgroup limits of the container's ``resources.limits`` (no limit: unlimited)."""
    limits = (container.get("resources") or {}).get("limits") or {}
    return Limits(
        memory_bytes=memory_bytes(limits["memory"]) if "memory" in limits else None,
        cpu_millis=cpu_millis(limits["cpu"]) if "cpu" in limits else None,
    )


def launch_spec(
    *,
    argv: list[str],
    env: dict[str, str],
    cwd: str,
    security: Security,
    mounts: list[dict],
    hostname: str | None,
    netns: str | None,
    cgroup: Cgroup | None,
) -> dict:
    """The JSON document :mod:`localcluster.enter` turns into the container's process."""
    return {
        "argv": argv,
        "env": env,
        "cwd": cwd,
        "uid": security.uid,
        "gid": security.gid if security.uid is not None else None,
        "groups": security.groups,
        "mounts": mounts,
        "read_only_root": security.read_only_root,
        "hostname": hostname,
        "netns": f"/run/netns/{netns}" if netns else None,
        "cgroup_procs": [str(p) for p in cgroup.procs_files] if cgroup else [],
    }


async def spawn(spec_file: Path, log_file: Path) -> asyncio.subprocess.Process:
    """Run enter.py on ``spec_file`` in a session of its own, appending to ``log_file``."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as output:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", str(ENTER), str(spec_file),
            stdin=asyncio.subprocess.DEVNULL, stdout=output, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


async def kill(process: asyncio.subprocess.Process, group: Cgroup | None) -> None:
    """SIGKILL everything in the container's cgroup and the process itself, then reap it."""
    if group is not None:
        for pid in group.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    await process.wait()


def hosts_file(
    spec: dict, cluster: ClusterConfig, namespace: str, name: str, pod_ip: str | None
) -> str:
    """The Pod's ``/etc/hosts``: localhost, the Pod's own names on its address, hostAliases."""
    hostname = spec.get("hostname") or name
    names = [hostname]
    if spec.get("subdomain"):
        names.insert(0, f"{hostname}.{spec['subdomain']}.{namespace}.svc.{cluster.cluster_domain}")
    hosts = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
    hosts.append(f"{pod_ip}\t{' '.join(names)}")
    for alias in spec.get("hostAliases") or []:
        hosts.append(f"{alias['ip']}\t{' '.join(alias.get('hostnames') or [])}")
    return "\n".join(hosts) + "\n"


def resolv_conf(spec: dict, cluster: ClusterConfig, namespace: str) -> str:
    """The Pod's ``/etc/resolv.conf``: the machine's for hostNetwork or dnsPolicy Default, else
    the cluster's DNS server on the bridge with the namespace's search path."""
    policy = spec.get("dnsPolicy") or "ClusterFirst"
    if spec.get("hostNetwork") or policy == "Default":
        return Path("/etc/resolv.conf").read_text()
    domain = cluster.cluster_domain
    return (
        f"search {namespace}.svc.{domain} svc.{domain} {domain}\n"
        f"nameserver {cluster.bridge_ip}\noptions ndots:5\n"
    )
