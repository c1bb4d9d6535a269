"""Start and stop the control plane as local processes: etcd, kube-apiserver,
kube-controller-manager and kube-scheduler on 127.0.0.1, then the host's Pod network, the node
agent and kube-proxy. Every process runs in its own session with its log in ``<cluster>/logs``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from localcluster import images, network
from localcluster.config import ROOT, ClusterConfig, ClusterState
from localcluster.credentials import Credentials, issue_credentials
from localcluster.pki import ClusterPKI, KeyPair

BUILD_SCRIPT = ROOT / "tools" / "cluster" / "build.sh"
COMPONENTS = ("etcd", "apiserver", "controller-manager", "scheduler", "agent", "kube-proxy")


class ClusterError(RuntimeError):
    """The cluster could not start (the message names the component and its log)."""


def binaries(*, build: bool = True) -> dict[str, Path]:
    """The control plane's binaries, built (once per version) by tools/cluster/build.sh."""
    command = [str(BUILD_SCRIPT)] if build else [str(BUILD_SCRIPT), "--print"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise ClusterError(f"tools/cluster/build.sh failed:\n{done.stderr.strip()[-3000:]}")
    folders = [Path(line) for line in done.stdout.split() if line.strip()]
    found: dict[str, Path] = {}
    for folder in folders:
        for binary in folder.iterdir():
            if binary.is_file() and os.access(binary, os.X_OK):
                found[binary.name] = binary
    wanted = {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kube-proxy"}
    missing = wanted - set(found)
    if missing:
        raise ClusterError(f"tools/cluster/build.sh built no {', '.join(sorted(missing))}")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _spawn(name: str, argv: list[str], config: ClusterConfig, env: dict | None = None) -> int:
    logs = config.path("logs")
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            cwd=config.folder,
        )
    return process.pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process counts as gone.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def _wait(
    what: str,
    check: Callable[[], bool],
    timeout_s: float,
    state: ClusterState,
    component: str,
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pid = state.pids.get(component)
        if pid and not _alive(pid):
            raise ClusterError(
                f"{component} exited while starting; its log: "
                f"{state.config.path('logs', component + '.log')}\n{tail(state.config, component)}"
            )
        with contextlib.suppress(OSError, urllib.error.URLError, ssl.SSLError):
            if check():
                return
        time.sleep(0.1)
    raise ClusterError(
        f"{what} not ready after {timeout_s:.0f}s; log: "
        f"{state.config.path('logs', component + '.log')}\n{tail(state.config, component)}"
    )


def tail(config: ClusterConfig, component: str, lines: int = 15) -> str:
    path = config.path("logs", f"{component}.log")
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _https_ok(url: str, ca: Path | None, client: KeyPair | None) -> bool:
    context = ssl.create_default_context(cafile=str(ca)) if ca else ssl._create_unverified_context()
    if client:
        context.load_cert_chain(str(client.cert), str(client.key))
    with urllib.request.urlopen(url, context=context, timeout=2) as response:
        return bool(response.status == 200)


def _http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as response:
        return bool(response.status == 200)


AUDIT_POLICY = """apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: None
    users: ["system:kube-controller-manager", "system:kube-scheduler", "system:kube-proxy"]
  - level: None
    resources: [{group: "coordination.k8s.io", resources: ["leases"]}]
  - level: Metadata
"""


def start(config: ClusterConfig, *, timeout_s: float = 120.0) -> ClusterState:
    """Start a cluster in ``config.folder`` (stopping a stale one there first) and wait until
    its nodes are Ready and the default ServiceAccount exists. Returns its state."""
    config.folder.mkdir(parents=True, exist_ok=True)
    previous = ClusterState.load(config.folder)
    if previous is not None:
        stop(config.folder)
    began = time.monotonic()
    clear_stale(config.bridge)
    try:
        network.claim_bridge(config)  # before anything starts: one cluster per bridge
    except network.NetworkError as exc:
        raise ClusterError(str(exc)) from None
    bins = binaries()
    pki = ClusterPKI(config.path("pki"))
    state = _new_state(config)
    credentials = issue_credentials(config, pki, f"https://127.0.0.1:{state.ports['apiserver']}")
    _start_etcd(state, bins)
    _start_apiserver(state, bins, pki, credentials)
    _start_controllers(state, bins, pki, credentials)
    _start_node(state, bins, credentials)
    _wait_components(state)
    _wait_ready(state, timeout_s=max(10.0, timeout_s - (time.monotonic() - began)))
    state.ready_s = round(time.monotonic() - began, 2)
    state.save()
    return state


def _new_state(config: ClusterConfig) -> ClusterState:
    """The state of a cluster about to start, with a free loopback port for every listener."""
    state = ClusterState(config=config, started_at=time.time())
    for name in (
        "etcd", "etcd-peer", "apiserver", "controller-manager", "scheduler",
        "kube-proxy-health", "kube-proxy-metrics",
    ):  # fmt: skip
        state.ports[name] = free_port()
    state.save()
    return state


def _start_etcd(state: ClusterState, bins: dict[str, Path]) -> None:
    """Start etcd (a single member, no fsync: the cluster is disposable) and wait for health."""
    config = state.config
    etcd_dir = config.path("etcd")
    state.pids["etcd"] = _spawn(
        "etcd",
        [
            str(bins["etcd"]),
            "--name=local",
            f"--data-dir={etcd_dir}",
            f"--listen-client-urls=http://127.0.0.1:{state.ports['etcd']}",
            f"--advertise-client-urls=http://127.0.0.1:{state.ports['etcd']}",
            f"--listen-peer-urls=http://127.0.0.1:{state.ports['etcd-peer']}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{state.ports['etcd-peer']}",
            f"--initial-cluster=local=http://127.0.0.1:{state.ports['etcd-peer']}",
            "--listen-metrics-urls=",
            "--auto-compaction-retention=1",
            "--quota-backend-bytes=2147483648",
            "--unsafe-no-fsync=true",
            "--log-level=warn",
        ],
        config,
    )
    state.save()
    _wait(
        "etcd",
        lambda: _http_ok(f"http://127.0.0.1:{state.ports['etcd']}/health"),
        30,
        state,
        "etcd",
    )


def _start_apiserver(
    state: ClusterState, bins: dict[str, Path], pki: ClusterPKI, credentials: Credentials
) -> None:
    """Start kube-apiserver (Node and RBAC authorization, an audit log) and wait for readyz."""
    config = state.config
    audit_policy = config.path("audit-policy.yaml")
    audit_policy.write_text(AUDIT_POLICY)
    state.pids["apiserver"] = _spawn(
        "apiserver",
        [
            str(bins["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{state.ports['etcd']}",
            "--bind-address=127.0.0.1",
            f"--advertise-address={config.bridge_ip}",
            f"--secure-port={state.ports['apiserver']}",
            f"--cert-dir={config.path('pki', 'apiserver-generated')}",
            f"--tls-cert-file={credentials.apiserver.cert}",
            f"--tls-private-key-file={credentials.apiserver.key}",
            f"--client-ca-file={pki.ca.cert}",
            f"--service-account-issuer=https://kubernetes.default.svc.{config.cluster_domain}",
            f"--service-account-key-file={pki.service_account_pub}",
            f"--service-account-signing-key-file={pki.service_account_key}",
            f"--service-cluster-ip-range={config.service_cidr}",
            "--authorization-mode=Node,RBAC",
            "--allow-privileged=true",
            f"--kubelet-client-certificate={credentials.kubelet_client.cert}",
            f"--kubelet-client-key={credentials.kubelet_client.key}",
            f"--kubelet-certificate-authority={pki.ca.cert}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--audit-log-path={config.path('logs', 'audit.log')}",
            f"--audit-policy-file={audit_policy}",
            "--audit-log-maxsize=200",
            "--profiling=false",
            "--v=1",
        ],
        config,
    )
    state.save()
    _wait(
        "kube-apiserver",
        lambda: _https_ok(f"{credentials.server}/readyz", pki.ca.cert, credentials.admin),
        90,
        state,
        "apiserver",
    )


def _start_controllers(
    state: ClusterState, bins: dict[str, Path], pki: ClusterPKI, credentials: Credentials
) -> None:
    """Start kube-controller-manager and kube-scheduler; they are waited for with kube-proxy."""
    config = state.config
    controller_manager = credentials.kubeconfigs["controller-manager"]
    state.pids["controller-manager"] = _spawn(
        "controller-manager",
        [
            str(bins["kube-controller-manager"]),
            f"--kubeconfig={controller_manager}",
            f"--authentication-kubeconfig={controller_manager}",
            f"--authorization-kubeconfig={controller_manager}",
            "--bind-address=127.0.0.1",
            f"--secure-port={state.ports['controller-manager']}",
            f"--cert-dir={config.path('pki', 'controller-manager-generated')}",
            "--leader-elect=false",
            f"--service-account-private-key-file={pki.service_account_key}",
            f"--root-ca-file={pki.ca.cert}",
            "--use-service-account-credentials=true",
            f"--service-cluster-ip-range={config.service_cidr}",
            f"--cluster-signing-cert-file={pki.ca.cert}",
            f"--cluster-signing-key-file={pki.ca.key}",
            "--controllers=*",
            "--v=1",
        ],
        config,
    )
    scheduler = credentials.kubeconfigs["scheduler"]
    state.pids["scheduler"] = _spawn(
        "scheduler",
        [
            str(bins["kube-scheduler"]),
            f"--kubeconfig={scheduler}",
            f"--authentication-kubeconfig={scheduler}",
            f"--authorization-kubeconfig={scheduler}",
            "--bind-address=127.0.0.1",
            f"--secure-port={state.ports['scheduler']}",
            f"--cert-dir={config.path('pki', 'scheduler-generated')}",
            "--leader-elect=false",
            "--v=1",
        ],
        config,
    )
    state.save()


def _start_node(state: ClusterState, bins: dict[str, Path], credentials: Credentials) -> None:
    """Prepare the images and the host's Pod network, then start the node agent and kube-proxy."""
    config = state.config
    images.prepare()
    network.setup_host(config)
    state.pids["agent"] = _spawn(
        "agent",
        [sys.executable, "-m", "localcluster.agent", str(config.folder)],
        config,
        env={"PYTHONPATH": os.pathsep.join([str(ROOT / "tools" / "cluster"), str(ROOT)])},
    )
    state.pids["kube-proxy"] = _spawn(
        "kube-proxy",
        [
            str(bins["kube-proxy"]),
            f"--kubeconfig={credentials.kubeconfigs['kube-proxy']}",
            "--proxy-mode=iptables",
            f"--hostname-override={config.nodes[0].name}",
            f"--cluster-cidr={config.pod_cidr}",
            "--masquerade-all=true",
            "--conntrack-max-per-core=0",
            f"--metrics-bind-address=127.0.0.1:{state.ports['kube-proxy-metrics']}",
            f"--healthz-bind-address=127.0.0.1:{state.ports['kube-proxy-health']}",
            "--v=1",
        ],
        config,
    )
    state.save()


def _wait_components(state: ClusterState) -> None:
    """Wait for the controller manager's, the scheduler's and kube-proxy's health endpoints."""
    for component in ("controller-manager", "scheduler"):
        url = f"https://127.0.0.1:{state.ports[component]}/healthz"
        _wait(
            component,
            functools.partial(_https_ok, url, None, None),
            60,
            state,
            component,
        )
    _wait(
        "kube-proxy",
        lambda: _http_ok(f"http://127.0.0.1:{state.ports['kube-proxy-health']}/livez"),
        60,
        state,
        "kube-proxy",
    )


def api_get(state: ClusterState, path: str) -> dict:
    """GET ``path`` from the API server as the cluster admin."""
    pki = state.config.path("pki")
    context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    with urllib.request.urlopen(state.api_url + path, context=context, timeout=5) as response:
        return dict(json.loads(response.read()))


def _wait_ready(state: ClusterState, timeout_s: float) -> None:
    """Every node Ready and without the not-ready taint; the default ServiceAccount exists."""

    def nodes_ready() -> bool:
        nodes = api_get(state, "/api/v1/nodes")["items"]
        names = {n["metadata"]["name"] for n in nodes}
        if names != {n.name for n in state.config.nodes}:
            return False
        for node in nodes:
            conditions = {c["type"]: c["status"] for c in node["status"].get("conditions", [])}
            taints = {t["key"] for t in node["spec"].get("taints", [])}
            if conditions.get("Ready") != "True" or "node.kubernetes.io/not-ready" in taints:
                return False
        return True

    _wait("the nodes", nodes_ready, timeout_s, state, "agent")
    _wait(
        "the default ServiceAccount",
        lambda: bool(api_get(state, "/api/v1/namespaces/default/serviceaccounts/default")),
        30,
        state,
        "controller-manager",
    )


def clear_stale(bridge: str) -> Path | None:
    """Clean up after a cluster on ``bridge`` that ended without being stopped (its test
    session killed, the machine's processes gone): its Pod namespaces, cgroups, iptables
    chains and the bridge. Returns its folder if there was one; a live cluster is left alone,
    and while another cluster runs, kube-proxy's (machine-wide) rules are not touched."""
    folder = network.bridge_owner(bridge)
    if folder is None or network.alive_owner(bridge) is not None:
        return None
    kube_proxy = None if network.live_clusters() else binaries(build=False).get("kube-proxy")
    state = ClusterState.load(folder)
    config = state.config if state is not None else ClusterConfig(folder=folder, bridge=bridge)
    network.teardown_host(config, kube_proxy=kube_proxy)
    config.state_file.unlink(missing_ok=True)
    return folder


def stop(folder: Path, *, grace_s: float = 10.0) -> list[str]:
    """Stop every process of the cluster in ``folder`` (reverse start order: SIGTERM, then
    SIGKILL), remove its Pods' processes and network; returns what was stopped."""
    state = ClusterState.load(folder)
    if state is None:
        return []
    stopped = []
    order = ["kube-proxy", "agent", "scheduler", "controller-manager", "apiserver", "etcd"]
    for component in order:
        pid = state.pids.get(component)
        if not pid or not _alive(pid):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while _alive(pid):
                time.sleep(0.05)
        stopped.append(component)
    network.teardown_host(state.config, kube_proxy=binaries(build=False).get("kube-proxy"))
    state.config.state_file.unlink(missing_ok=True)
    return stopped
