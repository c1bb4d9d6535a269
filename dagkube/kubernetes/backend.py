"""KubernetesBackend: the scaler's workers as Pods (the Kubernetes twin of LocalBackend).

One list of the pool's Pods (by label) per ``reap``; Pods it creates are cached on creation, so
``alive`` needs no request. Every step can be retried: creating a Pod that exists is success,
deleting one that is gone is success, and Pods of the pool found in the API (e.g. after an
operator restart) are adopted instead of duplicated.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, cast

from kubernetes_asyncio import client, config

from dagkube.errors import DagkubeError
from dagkube.kubernetes.pods import (
    DEFAULT_EPHEMERAL_STORAGE_MIB,
    LABEL_CLASS,
    LABEL_POOL,
    WORKER_CONTAINER,
    build_worker_pod,
    pool_label,
    pool_selector,
    worker_pod_name,
    worker_pod_serial,
)
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB, parse_memory
from dagkube.runtime.scaler import WorkerExit, WorkerHandle

log = logging.getLogger("dagkube.kubernetes")

# A Pod's phases (not a Workflow's: those are dagkube.kubernetes.workflow_cr.Phase) after
# which its containers do not run again.
ENDED_POD_PHASES = ("Succeeded", "Failed")
# Why a Pod can stay Pending for good, as the kubelet reports it in a container's waiting state.
STUCK_WAITING = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
    }
)


@dataclass(frozen=True)
class StuckPod:
    """A worker Pod that is Pending for a reason that will not pass by itself."""

    name: str
    reason: str  # Unschedulable, ImagePullBackOff, CreateContainerConfigError, ...
    message: str  # the scheduler's or the kubelet's own words
    created_at: float  # epoch seconds


def stuck_pods(pods: dict[str, dict[str, Any]]) -> list[StuckPod]:
    """The Pending Pods among ``pods`` that the scheduler could not place or the kubelet could
    not start, oldest first, each with the reason and message they report."""
    stuck = []
    for name, pod in pods.items():
        status = pod.get("status") or {}
        if status.get("phase") not in (None, "Pending") or pod["metadata"].get("deletionTimestamp"):
            continue
        created = pod["metadata"].get("creationTimestamp")
        created_at = (
            datetime.datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ")
            .replace(tzinfo=datetime.UTC)
            .timestamp()
            if created
            else time.time()
        )
        for condition in status.get("conditions") or []:
            if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
                reason = condition.get("reason") or "Unschedulable"
                stuck.append(StuckPod(name, reason, condition.get("message") or "", created_at))
        for container in status.get("containerStatuses") or []:
            waiting = (container.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in STUCK_WAITING:
                message = waiting.get("message") or ""
                stuck.append(StuckPod(name, waiting["reason"], message, created_at))
    return sorted(stuck, key=lambda s: (s.created_at, s.name))


class KubernetesBackendError(DagkubeError):
    """The Kubernetes API refused or failed a request of the backend."""


async def connect(url: str | None = None, user_agent: str | None = None) -> client.ApiClient:
    """An API client: to ``url`` as given (no credentials: tests, ``kubectl proxy``), else the
    in-cluster service account inside a Pod, else the local kubeconfig."""
    configuration = client.Configuration()
    if url is not None:
        configuration.host = url
    elif os.environ.get("KUBERNETES_SERVICE_HOST"):
        config.load_incluster_config(client_configuration=configuration)
    else:
        # $KUBECONFIG as it is now (the client library reads it once, when imported).
        await config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None,
            client_configuration=configuration,
        )
    api = client.ApiClient(configuration)
    if user_agent:
        api.user_agent = user_agent
    return api


def _worker_terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") == WORKER_CONTAINER:
            return (status.get("state") or {}).get("terminated") or {}
    return {}


def pod_exit_code(pod: dict[str, Any]) -> int | None:
    """Exit code of the worker container of an ended Pod, None while unknown."""
    code = _worker_terminated(pod).get("exitCode")
    return int(code) if code is not None else None


def pod_oom_killed(pod: dict[str, Any]) -> bool:
    """The worker container ended because it exceeded its memory limit."""
    return _worker_terminated(pod).get("reason") == "OOMKilled"


def _handle_of(pod: dict[str, Any]) -> WorkerHandle:
    """The WorkerHandle of a Pod found in the API (not created by this process)."""
    spawned_at = time.time()
    for container in pod["spec"]["containers"]:
        for variable in container.get("env") or []:
            if variable["name"] == "DAGKUBE_SPAWNED_AT":
                spawned_at = float(variable["value"])
    labels = pod["metadata"]["labels"]
    return WorkerHandle(pod["metadata"]["name"], parse_memory(labels[LABEL_CLASS]), spawned_at)


class KubernetesBackend:
    """Creates one Pod per worker in ``namespace``, labeled with ``pool`` (see ``pods``)."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        pool: str,
        image: str,
        redis_url_secret: tuple[str, str],
        max_workers: int,
        run_id: str | None = None,
        owner: dict[str, Any] | None = None,
        labels: dict[str, str] | None = None,
        idle_timeout_s: float = 30.0,
        memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
        max_cpu: float = DEFAULT_MAX_CPU,
        startup_delay_s: float = 0.0,
        ephemeral_storage_mib: int = DEFAULT_EPHEMERAL_STORAGE_MIB,
        active_deadline_s: int | None = None,
        redis_ca_secret: tuple[str, str] | None = None,
    ) -> None:
        self.core = client.CoreV1Api(api)
        self.namespace = namespace
        self.pool = pool
        self.image = image
        self.redis_url_secret = redis_url_secret
        self.max_workers = max_workers
        self.run_id = run_id
        self.owner = owner
        self.labels = labels
        self.idle_timeout_s = idle_timeout_s
        self.memory_per_cpu_mib = memory_per_cpu_mib
        self.max_cpu = max_cpu
        self.startup_delay_s = startup_delay_s
        self.ephemeral_storage_mib = ephemeral_storage_mib
        self.active_deadline_s = active_deadline_s
        self.redis_ca_secret = redis_ca_secret  # a TLS Redis' CA (see build_worker_pod)
        self.selector = pool_selector(pool)
        # Pod names derive from the owner's uid (a shared pool: from namespace and pool), so a
        # restarted operator names its Pods as before and adopts the ones that exist.
        self._name_key = (
            owner["uid"] if owner else hashlib.sha256(f"{namespace}/{pool}".encode()).hexdigest()
        )
        self._next_serial = 0
        self._workers: dict[str, WorkerHandle] = {}
        self._ended: set[str] = set()  # reported once, until their Pod is gone from the API
        self._discarded: set[str] = set()  # deleted on purpose: their end is no news
        self._synced = False
        self.last_pods: dict[str, dict[str, Any]] = {}  # the pool's Pods as last listed

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        if not self._synced:
            await self._list()  # adopt existing Pods and skip their serials
        name = worker_pod_name(self._name_key, memory_mib, self._next_serial)
        self._next_serial += 1
        spawned_at = time.time()
        body = build_worker_pod(
            name=name,
            namespace=self.namespace,
            # A pool serving many runs labels each Pod with the run it was created for.
            run_id=self.run_id or prewarm_for or demand_for,
            pool=self.pool,
            memory_mib=memory_mib,
            image=self.image,
            redis_url_secret=self.redis_url_secret,
            idle_timeout_s=self.idle_timeout_s,
            spawned_at=spawned_at,
            memory_per_cpu_mib=self.memory_per_cpu_mib,
            max_cpu=self.max_cpu,
            owner=self.owner,
            labels=self.labels,
            startup_delay_s=self.startup_delay_s,
            prewarm_for=prewarm_for,
            demand_for=demand_for,
            ephemeral_storage_mib=self.ephemeral_storage_mib,
            active_deadline_s=self.active_deadline_s,
            redis_ca_secret=self.redis_ca_secret,
        )
        created = await self._call(
            f"create worker Pod {name!r}",
            # The client sends plain dicts as they are; its stubs only name the model class.
            self.core.create_namespaced_pod(
                self.namespace, cast(Any, body), _preload_content=False
            ),
            accept=409,
        )
        if created is None:
            await self._adopt_existing(name)
        handle = WorkerHandle(name, memory_mib, spawned_at)
        self._workers[name] = handle
        log.debug("created worker Pod %s/%s (%d MiB)", self.namespace, name, memory_mib)
        return handle

    def alive(self) -> list[WorkerHandle]:
        return list(self._workers.values())

    async def reap(self) -> list[WorkerExit]:
        """Workers whose Pod ended (Succeeded/Failed) or vanished since the last call, once each.
        Succeeded Pods are deleted; Failed ones stay for ``kubectl logs`` until ``stop_all``."""
        pods = await self._list()
        exited: list[WorkerExit] = []
        for name, handle in list(self._workers.items()):
            pod = pods.get(name)
            phase = (pod.get("status") or {}).get("phase") if pod else None
            if pod is not None and phase not in ENDED_POD_PHASES:
                continue
            code = pod_exit_code(pod) if pod else None
            del self._workers[name]
            self._ended.add(name)
            oom = pod_oom_killed(pod) if pod else False
            exited.append(WorkerExit(handle, code, oom_killed=oom))
            if phase == "Succeeded":
                await self._delete(name)
            elif name not in self._discarded:
                log.warning(
                    "worker Pod %s/%s %s (exit code %s)",
                    self.namespace,
                    name,
                    ("was OOM-killed" if oom else "failed") if phase else "vanished",
                    code,
                )
        return exited

    async def discard(self, worker_id: str) -> None:
        """Delete the worker's Pod; ``reap`` reports it once it is gone."""
        self._discarded.add(worker_id)
        await self._delete(worker_id)

    async def stop_all(self) -> None:
        """Delete every Pod of the pool (one list, then the deletes concurrently)."""
        pods = await self._list()
        self._discarded.update(pods)
        await asyncio.gather(*(self._delete(name) for name in pods))

    async def pods(self) -> dict[str, dict[str, Any]]:
        """The pool's Pods in the API now, by name (as plain JSON objects)."""
        return await self._list()

    async def _list(self) -> dict[str, dict[str, Any]]:
        """The pool's Pods by name; adopts those this backend does not know yet."""
        answer = await self._call(
            f"list worker Pods ({self.selector})",
            self.core.list_namespaced_pod(
                self.namespace, label_selector=self.selector, _preload_content=False
            ),
        )
        items = (answer or {}).get("items") or []
        # The API server applies the selector; checked again so that nothing outside the pool
        # (e.g. from a server or proxy that ignores selectors) is ever taken for a worker.
        pods = {
            pod["metadata"]["name"]: pod
            for pod in items
            if (pod["metadata"].get("labels") or {}).get(LABEL_POOL) == pool_label(self.pool)
        }
        for name, pod in pods.items():
            if name not in self._workers and name not in self._ended:
                self._workers[name] = _handle_of(pod)
                log.info("adopted worker Pod %s/%s", self.namespace, name)
            serial = worker_pod_serial(name, self._name_key)
            if serial is not None:
                self._next_serial = max(self._next_serial, serial + 1)
        self._ended.intersection_update(pods)
        self._discarded.intersection_update(pods.keys() | self._workers.keys())
        self._synced = True
        self.last_pods = pods
        return pods

    async def _adopt_existing(self, name: str) -> None:
        """A create met a Pod of that name: ours (a retried create) unless another pool's."""
        existing = await self._call(
            f"read worker Pod {name!r}",
            self.core.read_namespaced_pod(name, self.namespace, _preload_content=False),
        )
        owner_pool = ((existing or {}).get("metadata", {}).get("labels") or {}).get(LABEL_POOL)
        if owner_pool != pool_label(self.pool):
            raise KubernetesBackendError(
                f"Cannot create worker Pod {name!r} in namespace {self.namespace!r}: a Pod of "
                f"that name exists with {LABEL_POOL}={owner_pool!r}, not {self.pool!r}"
            )
        log.info("worker Pod %s/%s already exists: adopted", self.namespace, name)

    async def _delete(self, name: str) -> None:
        await self._call(
            f"delete worker Pod {name!r}",
            self.core.delete_namespaced_pod(name, self.namespace, _preload_content=False),
            accept=404,
        )

    async def _call(
        self, what: str, request: Awaitable[Any], accept: int | None = None
    ) -> dict[str, Any] | None:
        """The JSON answer of an API request; None for the ``accept``-ed error status (409 on
        create, 404 on delete), a KubernetesBackendError naming the request for any other.

        Answers are read as plain JSON, not as the client's models: those reject objects
        that lack fields they deem required and would cost a conversion per Pod listed.
        """
        response = await request
        async with response:
            body = await response.read()
        if 200 <= response.status < 300:
            return cast(dict[str, Any], json.loads(body))
        if response.status == accept:
            return None
        try:
            status = json.loads(body)
        except ValueError:
            status = body.decode(errors="replace")
        message = status.get("message") if isinstance(status, dict) else status
        raise KubernetesBackendError(
            f"Cannot {what} in namespace {self.namespace!r}: {response.status} {response.reason}"
            + (f": {message}" if message else "")
        )
