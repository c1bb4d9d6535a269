"""The local control plane for tests: one real cluster per test session (see localcluster), and
a small ``kubectl``/API helper. Requested through the ``local_cluster`` fixture (conftest)."""

from __future__ import annotations

import contextlib
import json
import os
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import controlplane, network
from localcluster.config import ClusterConfig, ClusterState, NodeSpec

# Another bridge and other ranges than `make cluster-up`'s, so a test cluster is recognizable.
TEST_BRIDGE = "dktest0"
TEST_POD_CIDR = "10.245.0.0/24"
TEST_SERVICE_CIDR = "10.97.0.0/16"


class ClusterUnavailable(RuntimeError):
    pass


def other_cluster_running() -> str | None:
    """The bridge of another local cluster that still runs on this machine (kube-proxy's rules
    are global: two clusters at once would fight over them). What a cluster that ended without
    being stopped left behind (a killed test session) is cleaned up instead."""
    live = network.live_clusters()
    if live:
        return next(iter(live))
    links = subprocess.run(
        ["ip", "-o", "link", "show", "type", "bridge"], capture_output=True, text=True
    )
    for line in links.stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("dk") and controlplane.clear_stale(name) is None:
            return name  # a dk bridge no local cluster claims: not ours to remove
    return None


def start_cluster(folder: Path) -> ClusterState:
    if os.geteuid() != 0:
        raise ClusterUnavailable(
            "the local control plane needs root (network namespaces, cgroups, iptables)"
        )
    running = other_cluster_running()
    if running is not None:
        raise ClusterUnavailable(
            f"another local cluster is running (bridge {running}): stop it with "
            "`make cluster-down` (or `python -m localcluster down --folder ...`) first"
        )
    config = ClusterConfig(
        folder=folder,
        bridge=TEST_BRIDGE,
        pod_cidr=TEST_POD_CIDR,
        service_cidr=TEST_SERVICE_CIDR,
        nodes=[
            NodeSpec("node-0", cpu="4", memory="12Gi"),
            NodeSpec("node-1", cpu="4", memory="12Gi"),
        ],
    )
    return controlplane.start(config)


@dataclass
class Kube:
    """kubectl and plain API calls against one cluster, as its admin."""

    state: ClusterState
    kubectl_path: Path

    @property
    def kubeconfig(self) -> Path:
        return self.state.config.kubeconfig

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [str(self.kubectl_path), f"--kubeconfig={self.kubeconfig}", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip
        if check and done.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {done.stderr.strip()}")
        return done

    def apply(self, manifest: str | dict | list, namespace: str = "default") -> None:
        if not isinstance(manifest, str):
            items = manifest if isinstance(manifest, list) else [manifest]
            manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": items})
        self.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)

    def get(self, kind: str, name: str, namespace: str = "default") -> dict | None:
        done = self.kubectl("get", kind, name, "-n", namespace, "-o", "json", check=False)
        if done.returncode != 0:
            if "NotFound" in done.stderr:
                return None
            raise AssertionError(done.stderr)
        return dict(json.loads(done.stdout))

    def list(
        self, kind: str, namespace: str = "default", selector: str | None = None
    ) -> list[dict]:
        args = ["get", kind, "-n", namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return list(json.loads(self.kubectl(*args).stdout)["items"])

    def request(
        self, method: str, path: str, body: Any = None, *, token: str | None = None
    ) -> tuple[int, Any]:
        """One API call as the admin (or with a bearer ``token``): status and decoded body."""
        pki = self.state.config.path("pki")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        kind = "application/merge-patch+json" if method == "PATCH" else "application/json"
        headers = {"Content-Type": kind}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        else:
            context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.state.api_url + path, data, headers, method=method)
        try:
            with urllib.request.urlopen(request, context=context, timeout=30) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def pod_phase(self, name: str, namespace: str = "default") -> str | None:
        pod = self.get("pod", name, namespace)
        return (pod.get("status") or {}).get("phase") if pod else None


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, every_s: float = 0.2
) -> Any:
    """Poll ``condition`` until it is truthy, with a deadline (no fixed sleeps)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = condition()
        if last:
            return last
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what} (last: {last!r})")


class PodRecorder:
    """Every Pod of a namespace as last seen, kept after the Pod is gone (a watch in a
    thread): tests inspect worker Pods that the operator has already removed."""

    def __init__(self, kube: Kube, namespace: str) -> None:
        self.pods: dict[str, dict] = {}
        self.first_seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self._kube = kube
        self._namespace = namespace
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"pods {namespace}")
        self._thread.start()

    def _run(self) -> None:
        pki = self._kube.state.config.path("pki")
        context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        base = f"{self._kube.state.api_url}/api/v1/namespaces/{self._namespace}/pods"
        while not self._stop.is_set():
            with contextlib.suppress(OSError, ValueError):
                with urllib.request.urlopen(base, context=context, timeout=30) as response:
                    listed = json.loads(response.read())
                for pod in listed["items"]:
                    self._keep(pod)
                version = listed["metadata"]["resourceVersion"]
                url = f"{base}?watch=1&resourceVersion={version}&timeoutSeconds=60"
                with urllib.request.urlopen(url, context=context, timeout=90) as stream:
                    for line in stream:
                        if self._stop.is_set():
                            return
                        event = json.loads(line)
                        if event.get("type") in ("ADDED", "MODIFIED", "DELETED"):
                            self._keep(event["object"])

    def _keep(self, pod: dict) -> None:
        name = pod["metadata"]["name"]
        with self._lock:
            self.pods[name] = pod
            self.first_seen.setdefault(name, time.time())

    def with_label(self, key: str, value: str) -> list[dict]:
        with self._lock:
            return [
                p
                for p in self.pods.values()
                if (p["metadata"].get("labels") or {}).get(key) == value
            ]

    def stop(self) -> None:
        self._stop.set()
