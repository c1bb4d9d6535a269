"""The node agent: registers the cluster's Nodes, keeps them Ready (status and Lease), runs the
Pods bound to them (:mod:`localcluster.agent.pod`), serves ``kubectl logs`` like a kubelet, and
runs two node-level helpers: the cluster DNS and the relay to the API server."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import platform
import ssl
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from dagkube.runtime import cgroups
from localcluster import network
from localcluster.agent import dns, proxy, storage
from localcluster.agent.api import Api, ApiError, informer
from localcluster.agent.pod import PodWorker
from localcluster.agent.podstatus import now_rfc3339
from localcluster.config import ClusterConfig, ClusterState, NodeSpec
from localcluster.pki import ClusterPKI

log = logging.getLogger("localcluster.agent")

KUBELET_VERSION = "v1.37.2"
LEASE_SECONDS = 40
RENEW_EVERY_S = 10.0
STATUS_EVERY_S = 30.0


TAIL_WINDOW_BYTES = 4 << 20  # a tailLines request reads at most this much of the log


class Ipam:
    """Pod addresses from the cluster's Pod range (the bridge keeps the first), handed out in
    turn after the last one given, as the host-local IPAM plugin does: an address freed by a
    Pod is used again only after the rest of the range."""

    def __init__(self, cidr: str) -> None:
        hosts = list(ipaddress.ip_network(cidr).hosts())
        self.free = [str(h) for h in hosts[1:]]
        self.taken: dict[str, str] = {}
        self._next = 0

    def allocate(self, uid: str, preferred: str | None = None) -> str:
        """An address for the Pod ``uid``: the one it had (``preferred``) when still free, so
        a restarted agent does not move Pods."""
        if uid in self.taken:
            return self.taken[uid]
        used = set(self.taken.values())
        if preferred in self.free and preferred not in used:
            self.taken[uid] = str(preferred)
            return str(preferred)
        for step in range(len(self.free)):
            index = (self._next + step) % len(self.free)
            if self.free[index] not in used:
                self._next = index + 1
                self.taken[uid] = self.free[index]
                return self.free[index]
        raise network.NetworkError("the Pod address range is exhausted")

    def release(self, uid: str) -> None:
        self.taken.pop(uid, None)


class Agent:
    def __init__(self, state: ClusterState) -> None:
        self.state = state
        self.cluster: ClusterConfig = state.config
        self.ipam = Ipam(self.cluster.pod_cidr)
        self.cgroups = cgroups.detect()
        self.records = dns.Records(self.cluster.cluster_domain)
        self.stop = asyncio.Event()
        self.nodes: list[NodeRunner] = []
        self.admin: Api | None = None

    def service_env(self, namespace: str, spec: dict) -> dict[str, str]:
        """KUBERNETES_SERVICE_* always; Service links of the namespace unless disabled."""
        env: dict[str, str] = {}
        services = self.records.services
        wanted = [("default", "kubernetes")]
        if spec.get("enableServiceLinks", True):
            wanted += [key for key in services if key[0] == namespace]
        for key in wanted:
            service = services.get(key)
            if not service:
                continue
            ip = (service.get("spec") or {}).get("clusterIP")
            ports = (service.get("spec") or {}).get("ports") or []
            if not ip or ip == "None" or not ports:
                continue
            prefix = key[1].upper().replace("-", "_")
            first = ports[0]
            env[f"{prefix}_SERVICE_HOST"] = ip
            env[f"{prefix}_SERVICE_PORT"] = str(first["port"])
            protocol = first.get("protocol", "TCP")
            env[f"{prefix}_PORT"] = f"{protocol.lower()}://{ip}:{first['port']}"
            for port in ports:
                if port.get("name"):
                    env[f"{prefix}_SERVICE_PORT_{port['name'].upper().replace('-', '_')}"] = str(
                        port["port"]
                    )
        return env

    async def run(self) -> None:
        # Containers of an earlier agent of this cluster (killed without its clean-up) would
        # run twice next to the ones this agent starts for the same Pods: remove them first.
        for namespace in network.pod_namespaces(self.cluster):
            network.remove_pod_namespace(namespace)
        network.remove_cgroups(self.cluster)
        if self.cgroups is None:
            log.warning("no writable cgroup hierarchy: container limits are not enforced")
        else:
            log.info("cgroup %s: container memory and CPU limits are enforced", self.cgroups.layout)
        self.admin = await Api.from_kubeconfig(str(self.cluster.kubeconfig))
        relay = await proxy.serve(self.cluster.bridge_ip, self.state.ports["apiserver"])
        dns_transport = await dns.serve(self.records, self.cluster.bridge_ip)
        provisioner = storage.Provisioner(self.admin, self.cluster.path("volumes"))
        await provisioner.ensure_class()
        watchers = [
            asyncio.create_task(
                informer(self.admin, "/api/v1/services", self._services, stop=self.stop)
            ),
            asyncio.create_task(
                informer(
                    self.admin,
                    "/api/v1/persistentvolumeclaims",
                    provisioner.claim_event,
                    stop=self.stop,
                )
            ),
            asyncio.create_task(
                informer(
                    self.admin,
                    "/api/v1/persistentvolumes",
                    provisioner.volume_event,
                    stop=self.stop,
                )
            ),
            asyncio.create_task(
                informer(
                    self.admin,
                    "/apis/discovery.k8s.io/v1/endpointslices",
                    self._slices,
                    stop=self.stop,
                )
            ),
        ]
        pki = ClusterPKI(self.cluster.path("pki"))
        for spec in self.cluster.nodes:
            runner = NodeRunner(self, spec, pki)
            await runner.start()
            self.nodes.append(runner)
        await self.stop.wait()
        log.info("stopping: every Pod of this node stops now")
        for runner in self.nodes:
            await runner.close()
        for task in watchers:
            task.cancel()
        relay.close()
        dns_transport.close()
        await self.admin.close()

    async def _services(self, kind: str, obj: Any) -> None:
        if kind == "SYNC":
            self.records.set_services(obj)
        else:
            self.records.service_event(kind, obj)

    async def _slices(self, kind: str, obj: Any) -> None:
        if kind == "SYNC":
            self.records.set_slices(obj)
        else:
            self.records.slice_event(kind, obj)


class NodeRunner:
    def __init__(self, agent: Agent, spec: NodeSpec, pki: ClusterPKI) -> None:
        self.agent = agent
        self.cluster = agent.cluster
        self.spec = spec
        self.name = spec.name
        self.pki = pki
        self.api: Api
        self.pods: dict[str, PodWorker] = {}
        self.tasks: list[asyncio.Task] = []
        self.kubelet_port = 0
        self._site: web.TCPSite | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        self.api = await Api.from_kubeconfig(str(self.cluster.path(f"node-{self.name}.kubeconfig")))
        await self._serve_kubelet()
        await self._register()
        self.tasks = [
            asyncio.create_task(self._renew_lease(), name=f"lease {self.name}"),
            asyncio.create_task(self._report_status(), name=f"status {self.name}"),
            asyncio.create_task(
                informer(
                    self.api,
                    "/api/v1/pods",
                    self._pod_event,
                    stop=self.agent.stop,
                    fieldSelector=f"spec.nodeName={self.name}",
                ),
                name=f"pods {self.name}",
            ),
        ]

    async def close(self) -> None:
        for worker in list(self.pods.values()):
            worker.task.cancel()
        await asyncio.gather(*(w.task for w in self.pods.values()), return_exceptions=True)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        await self.api.close()

    # ------------------------------------------------------------------ the Node object
    def _node_status(self) -> dict:
        stamp = now_rfc3339()
        capacity = {
            "cpu": self.spec.cpu,
            "memory": self.spec.memory,
            "pods": str(self.spec.pods),
            "ephemeral-storage": "50Gi",
        }

        def condition(kind: str, value: str, reason: str, message: str) -> dict:
            return {
                "type": kind,
                "status": value,
                "reason": reason,
                "message": message,
                "lastHeartbeatTime": stamp,
                "lastTransitionTime": stamp,
            }

        return {
            "capacity": capacity,
            "allocatable": capacity,
            "conditions": [
                condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "ok"),
                condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "ok"),
                condition("PIDPressure", "False", "KubeletHasSufficientPID", "ok"),
                condition("Ready", "True", "KubeletReady", "dagkube local node agent is ready"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": self.kubelet_port}},
            "nodeInfo": {
                "machineID": self.name,
                "systemUUID": self.name,
                "bootID": str(int(time.time())),
                "kernelVersion": platform.release(),
                "osImage": "dagkube local node (processes in cgroups and network namespaces)",
                "containerRuntimeVersion": "dagkube-local://0.1",
                "kubeletVersion": KUBELET_VERSION,
                "kubeProxyVersion": KUBELET_VERSION,
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
        }

    async def _register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.dagkube.io/local": "true",
                },
            },
        }
        try:
            await self.api.create("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        await self.api.patch(f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()})
        await self._renew()

    async def _renew(self) -> None:
        path = f"/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/{self.name}"
        renew = now_rfc3339().replace("Z", ".000000Z")
        try:
            await self.api.patch(path, {"spec": {"renewTime": renew}}, strategic=False)
        except ApiError as exc:
            if exc.status != 404:
                raise
            await self.api.create(
                "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases",
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": "kube-node-lease"},
                    "spec": {
                        "holderIdentity": self.name,
                        "leaseDurationSeconds": LEASE_SECONDS,
                        "renewTime": renew,
                    },
                },
            )

    async def _renew_lease(self) -> None:
        while True:
            await asyncio.sleep(RENEW_EVERY_S)
            try:
                await self._renew()
            except Exception as exc:
                log.warning("node %s: lease renewal failed: %s", self.name, exc)

    async def _report_status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            try:
                await self.api.patch(
                    f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()}
                )
            except Exception as exc:
                log.warning("node %s: status update failed: %s", self.name, exc)

    # ------------------------------------------------------------------ Pods
    async def _pod_event(self, kind: str, obj: Any) -> None:
        if kind == "SYNC":
            seen = {p["metadata"]["uid"] for p in obj}
            for uid, worker in list(self.pods.items()):
                if uid not in seen:
                    worker.gone()
            for pod in obj:
                self._observe(pod)
            return
        uid = obj["metadata"]["uid"]
        if kind == "DELETED":
            gone = self.pods.get(uid)
            if gone is not None:
                gone.gone()
            return
        self._observe(obj)

    def _observe(self, pod: dict) -> None:
        uid = pod["metadata"]["uid"]
        existing = self.pods.get(uid)
        if existing is None:
            existing = self.pods[uid] = PodWorker(self, pod)
            existing.task.add_done_callback(functools.partial(self._forget, uid))
        existing.update(pod)

    def _forget(self, uid: str, _task: asyncio.Task | None = None) -> None:
        worker = self.pods.get(uid)
        if (
            worker is not None
            and worker.task.done()
            and (worker.removed or worker.deleting.is_set())
        ):
            self.pods.pop(uid, None)

    # ------------------------------------------------------------------ kubectl logs
    async def _serve_kubelet(self) -> None:
        """HTTPS endpoint the API server calls for ``kubectl logs`` (client certificate of the
        API server required)."""
        serving = self.pki.issue(
            f"kubelet-{self.name}",
            f"system:node:{self.name}",
            organizations=("system:nodes",),
            hosts=("127.0.0.1", "localhost", self.name),
            server=True,
        )
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki.ca.cert))
        context.load_cert_chain(str(serving.cert), str(serving.key))
        context.verify_mode = ssl.CERT_REQUIRED
        app = web.Application()
        app.router.add_get("/containerLogs/{namespace}/{pod}/{container}", self._logs)
        app.router.add_get("/healthz", self._healthz)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await self._site.start()
        server: Any = self._site._server
        self.kubelet_port = int(server.sockets[0].getsockname()[1])

    async def _healthz(self, _request: web.Request) -> web.StreamResponse:
        return web.Response(text="ok")

    async def _logs(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        subject = dict(x[0] for x in (peer or {}).get("subject", ()))
        if subject.get("commonName") != "kube-apiserver-kubelet-client":
            return web.Response(status=403, text="only the API server may read logs here")
        namespace, name = request.match_info["namespace"], request.match_info["pod"]
        container = request.match_info["container"]
        candidates = [w for w in self.pods.values() if w.namespace == namespace and w.name == name]
        candidates.sort(key=lambda w: (not w.deleting.is_set(), w.started_at))
        worker = candidates[-1] if candidates else None
        if worker is None:
            return web.Response(status=404, text=f"pod {namespace}/{name} is not on {self.name}")
        previous = request.query.get("previous") in ("true", "1")
        path = worker.log_file(container, previous=previous)
        if path is None:
            return web.Response(status=404, text=f"no logs of container {container}")
        lines = request.query.get("tailLines")
        with open(path, "rb") as handle:
            if lines and lines.isdigit():
                # The tail of a log of any size: its last few MiB hold the lines asked for
                # (unless they are longer than that, which a kubelet would not cut).
                handle.seek(max(0, path.stat().st_size - TAIL_WINDOW_BYTES))
            data = handle.read()
        text = data.decode(errors="replace")
        if lines and lines.isdigit():
            text = "".join(text.splitlines(keepends=True)[-int(lines) :])
        limit = request.query.get("limitBytes")
        if limit and limit.isdigit():  # the first bytes of what is left, as a kubelet does
            text = text.encode()[: int(limit)].decode(errors="ignore")
        if request.query.get("follow") not in ("true", "1"):
            return web.Response(text=text)
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(text.encode())
        offset = path.stat().st_size
        state = worker.containers.get(container)
        while state is not None and state.pid is not None:
            await asyncio.sleep(0.5)
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                if size > offset:
                    with open(path, "rb") as handle:
                        handle.seek(offset)
                        await response.write(handle.read())
                    offset = size
        return response


def main(folder: Path) -> None:
    import signal

    logging.basicConfig(
        level=os.environ.get("DAGKUBE_AGENT_LOG", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    state = ClusterState.load(folder)
    if state is None:
        raise SystemExit(f"no cluster in {folder} (state.json missing)")
    agent = Agent(state)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, agent.stop.set)
        await agent.run()

    asyncio.run(run())
