"""The Pod network: a host-only bridge with the host's address on it, one network namespace per
Pod joined to the bridge by a veth pair, forwarding between them, and the cleanup of all of it.

Only private addresses of the cluster's ``pod_cidr`` and ``service_cidr`` are used; nothing is
routed off the machine (no NAT to the outside, no default route to the host's uplink).
kube-proxy writes the Service rules (iptables, ``--masquerade-all`` so replies between Pods on
the one bridge come back through the host).
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import signal
import subprocess
from pathlib import Path

from localcluster.config import ClusterConfig

FORWARD_CHAIN = "DAGKUBE-LOCAL-FWD"
NETNS_DIR = Path("/run/netns")


class NetworkError(RuntimeError):
    pass


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True)
    if check and done.returncode != 0:
        raise NetworkError(f"{' '.join(argv)}: {done.stderr.strip() or done.stdout.strip()}")
    return done


def _sysctl(path: str, value: str) -> None:
    Path("/proc/sys", path).write_text(value)


OWNERS = Path("/run/dagkube-local")


def bridge_owner(bridge: str) -> Path | None:
    """The folder of the cluster that last claimed ``bridge`` (alive or not), if any."""
    owner = OWNERS / f"{bridge}.owner"
    try:
        return Path(owner.read_text().strip())
    except OSError:
        return None


def alive_owner(bridge: str) -> Path | None:
    """The folder of the cluster using ``bridge`` whose processes still run, if any."""
    folder = bridge_owner(bridge)
    return folder if folder is not None and _alive_cluster(folder) else None


def live_clusters() -> dict[str, Path]:
    """Bridge -> folder of every local cluster on this machine whose processes still run."""
    if not OWNERS.is_dir():
        return {}
    found = {}
    for owner in sorted(OWNERS.glob("*.owner")):
        folder = alive_owner(owner.stem)
        if folder is not None:
            found[owner.stem] = folder
    return found


def claim_bridge(config: ClusterConfig) -> None:
    """Record this cluster as the user of its bridge, or refuse: another cluster whose control
    plane still runs uses it (two clusters on one bridge would share Pod addresses, DNS and
    kube-proxy's rules)."""
    OWNERS.mkdir(parents=True, exist_ok=True)
    owner = OWNERS / f"{config.bridge}.owner"
    if owner.exists():
        folder = Path(owner.read_text().strip())
        if folder != config.folder and _alive_cluster(folder):
            raise NetworkError(
                f"bridge {config.bridge} is used by the local cluster in {folder}: stop it "
                f"first (python -m localcluster down --folder {folder})"
            )
    owner.write_text(str(config.folder))


def _alive_cluster(folder: Path) -> bool:
    import json

    try:
        pids = json.loads((folder / "state.json").read_text()).get("pids") or {}
    except (OSError, ValueError):
        return False
    for pid in pids.values():
        try:
            os.kill(int(pid), 0)
        except (ProcessLookupError, ValueError):
            continue
        return True
    return False


def release_bridge(config: ClusterConfig) -> None:
    owner = OWNERS / f"{config.bridge}.owner"
    if owner.exists() and Path(owner.read_text().strip()) == config.folder:
        owner.unlink()


def setup_host(config: ClusterConfig) -> None:
    """The bridge with the host's address, forwarding, and accept rules for the bridge."""
    if os.geteuid() != 0:
        raise NetworkError("the local cluster's Pod network needs root (network namespaces)")
    for tool in ("ip", "iptables", "iptables-restore", "conntrack"):
        if subprocess.run(["sh", "-c", f"command -v {tool}"], capture_output=True).returncode:
            raise NetworkError(
                f"{tool} is missing: install iproute2, iptables and conntrack "
                "(make cluster-deps does it with apt-get)"
            )
    bridge = config.bridge
    network = ipaddress.ip_network(config.pod_cidr)
    if _run("ip", "link", "show", bridge, check=False).returncode != 0:
        _run("ip", "link", "add", bridge, "type", "bridge")
    # A bridge without an address of its own takes the lowest MAC of its ports, so each Pod
    # whose veth sorts lower changed the MAC of the Pods' gateway and DNS server: Pods that had
    # it cached sent their DNS queries (and Service traffic) nowhere until ARP noticed, about 5 s.
    _run("ip", "link", "set", bridge, "address", mac_of(config.bridge_ip))
    address = f"{config.bridge_ip}/{network.prefixlen}"
    if address not in _run("ip", "-4", "addr", "show", "dev", bridge).stdout:
        _run("ip", "addr", "add", address, "dev", bridge)
    _run("ip", "link", "set", bridge, "up")
    forward = Path("/proc/sys/net/ipv4/ip_forward")
    saved = config.path("ip_forward.saved")
    if not saved.exists():
        saved.write_text(forward.read_text().strip())
    _sysctl("net/ipv4/ip_forward", "1")
    # Service traffic between Pods on one bridge must pass the host's iptables (kube-proxy's
    # DNAT) in both directions.
    with contextlib.suppress(OSError):
        _sysctl("net/bridge/bridge-nf-call-iptables", "1")
    if _run("iptables", "-w", "-nL", FORWARD_CHAIN, check=False).returncode != 0:
        _run("iptables", "-w", "-N", FORWARD_CHAIN)
    _run("iptables", "-w", "-F", FORWARD_CHAIN)
    _run("iptables", "-w", "-A", FORWARD_CHAIN, "-i", bridge, "-j", "ACCEPT")
    _run("iptables", "-w", "-A", FORWARD_CHAIN, "-o", bridge, "-j", "ACCEPT")
    if _run("iptables", "-w", "-C", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode:
        _run("iptables", "-w", "-I", "FORWARD", "1", "-j", FORWARD_CHAIN)


def teardown_host(config: ClusterConfig, kube_proxy: Path | None) -> None:
    """Undo :func:`setup_host` and remove whatever Pod namespaces are left (their processes
    are killed first)."""
    for namespace in pod_namespaces(config):
        remove_pod_namespace(namespace)
    if kube_proxy is not None:
        subprocess.run([str(kube_proxy), "--cleanup"], capture_output=True)
    if _run("iptables", "-w", "-C", "FORWARD", "-j", FORWARD_CHAIN, check=False).returncode == 0:
        _run("iptables", "-w", "-D", "FORWARD", "-j", FORWARD_CHAIN, check=False)
    _run("iptables", "-w", "-F", FORWARD_CHAIN, check=False)
    _run("iptables", "-w", "-X", FORWARD_CHAIN, check=False)
    _run("ip", "link", "del", config.bridge, check=False)
    remove_cgroups(config)
    release_bridge(config)
    saved = config.path("ip_forward.saved")
    if saved.exists():
        _sysctl("net/ipv4/ip_forward", saved.read_text().strip() or "0")
        saved.unlink()


def pod_namespaces(config: ClusterConfig) -> list[str]:
    if not NETNS_DIR.exists():
        return []
    return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(config.netns_prefix))


def namespace_name(config: ClusterConfig, pod_uid: str) -> str:
    return config.netns_prefix + pod_uid.replace("-", "")[:12]


def _host_interface(pod_uid: str) -> str:
    return "dkv" + hashlib.sha256(pod_uid.encode()).hexdigest()[:11]  # at most 15 characters


def mac_of(address: str) -> str:
    """A locally administered MAC made of an IPv4 address (as Docker's bridge does)."""
    return "02:42:" + ":".join(f"{b:02x}" for b in ipaddress.IPv4Address(address).packed)


def create_pod_namespace(config: ClusterConfig, pod_uid: str, pod_ip: str) -> str:
    """A network namespace for a Pod with ``pod_ip`` on eth0, joined to the bridge; the host
    is its default gateway. Idempotent: an existing namespace is kept."""
    name = namespace_name(config, pod_uid)
    if (NETNS_DIR / name).exists():
        return name
    network = ipaddress.ip_network(config.pod_cidr)
    host_if = _host_interface(pod_uid)
    # The host end of an earlier namespace of this Pod can outlive it for a moment (the kernel
    # frees a namespace once its last process is gone): e.g. after a cluster restart.
    _run("ip", "link", "del", host_if, check=False)
    _run("ip", "netns", "add", name)
    try:
        # The Pod's MAC follows from its address (as Docker's bridge does): when a later Pod
        # gets the address again, neighbour entries the host and other Pods still hold for it
        # stay right.
        _run("ip", "link", "add", host_if, "type", "veth",
             "peer", "name", "eth0", "address", mac_of(pod_ip), "netns", name)  # fmt: skip
        _run("ip", "link", "set", host_if, "master", config.bridge, "up")
        inside = ("ip", "netns", "exec", name, "ip")
        _run(*inside, "link", "set", "lo", "up")
        _run(*inside, "addr", "add", f"{pod_ip}/{network.prefixlen}", "dev", "eth0")
        _run(*inside, "link", "set", "eth0", "up")
        _run(*inside, "route", "add", "default", "via", config.bridge_ip)
    except NetworkError:
        remove_pod_namespace(name)
        raise
    return name


def namespace_pids(name: str) -> list[int]:
    done = _run("ip", "netns", "pids", name, check=False)
    return [int(p) for p in done.stdout.split() if p.isdigit()]


def remove_pod_namespace(name: str) -> None:
    """Kill what still runs in the namespace, then delete it (its veth pair goes with it)."""
    for pid in namespace_pids(name):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    _run("ip", "netns", "del", name, check=False)


def remove_cgroups(config: ClusterConfig) -> None:
    """The cgroups of the cluster's Pods (processes still in them are killed)."""
    from dagkube.runtime import cgroups

    hierarchy = cgroups.detect()
    if hierarchy is None:
        return
    with contextlib.suppress(cgroups.CgroupError):
        group = hierarchy.create(f"dagkube-local/{config.bridge}", cgroups.Limits())
        group.remove()
    for root in hierarchy.roots.values():  # the shared parent, once no cluster uses it
        with contextlib.suppress(OSError):
            (root / "dagkube-local").rmdir()
