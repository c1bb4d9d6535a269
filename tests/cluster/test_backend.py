"""KubernetesBackend against the real API server: the Pods it creates, reaps and deletes.

The Pods here ask for more memory than any node has, so the scheduler places none of them
and no node agent runs them: a test plays the kubelet by writing their status subresource
(or deleting them), as the API server allows the admin to.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config

from dagkube.kubernetes.backend import KubernetesBackend, KubernetesBackendError
from dagkube.kubernetes.pods import build_pool_object, build_worker_pod, worker_pod_name
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.scaler import Scaler, WorkerExit
from dagkube.store.keys import PoolKeys
from tests.kube import Kube, wait_for

pytestmark = pytest.mark.cluster

IMAGE = "localhost/dagkube/worker:dev"
SECRET = ("dagkube-redis", "url")
BIG, BIGGER = 64 * 1024, 128 * 1024  # MiB: more than a node has, so never scheduled
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields")


@pytest.fixture
def namespace(local_cluster: Kube) -> Iterator[str]:
    name = f"b-{uuid.uuid4().hex[:8]}"
    local_cluster.kubectl("create", "namespace", name)
    wait_for(lambda: local_cluster.get("serviceaccount", "default", name), 30, "the namespace")
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")


@pytest.fixture
async def make_backend(local_cluster: Kube, namespace: str) -> AsyncIterator[Any]:
    """Backends on API clients of their own (as separate operator processes would)."""
    clients: list[k8s.ApiClient] = []

    async def make(api: k8s.ApiClient | None = None, **options: Any) -> KubernetesBackend:
        if api is None:
            api = await config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
        clients.append(api)
        options.setdefault("namespace", namespace)
        options.setdefault("pool", "wf-tree")
        options.setdefault("owner", {"name": "tree", "uid": "0f1e2d3c-aaaa-bbbb-cccc-000000000001"})
        options.setdefault("run_id", "tree-run-1")
        return KubernetesBackend(
            api, image=IMAGE, redis_url_secret=SECRET, max_workers=4, **options
        )

    yield make
    for api in clients:
        await api.close()


@pytest.fixture
async def backend(make_backend: Any) -> KubernetesBackend:
    return await make_backend()


def pods(kube: Kube, namespace: str) -> dict[str, dict]:
    return {p["metadata"]["name"]: p for p in kube.list("pods", namespace)}


def set_status(kube: Kube, namespace: str, name: str, status: dict) -> None:
    code, body = kube.request(
        "PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status}
    )
    assert code == 200, body


def terminated(phase: str, exit_code: int, reason: str | None = None) -> dict[str, Any]:
    """A Pod status whose worker container ended with ``exit_code``, as a kubelet writes it."""
    return {
        "phase": phase,
        "containerStatuses": [
            {
                "name": "worker",
                "image": IMAGE,
                "imageID": "",
                "ready": False,
                "restartCount": 0,
                "state": {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if exit_code == 0 else "Error"),
                        "startedAt": "2026-01-01T00:00:00Z",
                        "finishedAt": "2026-01-01T00:00:01Z",
                    }
                },
            }
        ],
    }


async def test_start_worker_creates_the_pod_the_builder_describes(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    handle = await backend.start_worker(BIG, prewarm_for="tree-run-0")
    assert backend.owner is not None
    assert handle.worker_id == worker_pod_name(backend.owner["uid"], BIG, 0)
    assert handle.memory_mib == BIG
    stored = local_cluster.get("pod", handle.worker_id, namespace)
    assert stored is not None
    built = build_worker_pod(
        name=handle.worker_id,
        namespace=namespace,
        run_id="tree-run-1",
        pool="wf-tree",
        memory_mib=BIG,
        image=IMAGE,
        redis_url_secret=SECRET,
        idle_timeout_s=30.0,
        spawned_at=handle.spawned_at,
        owner=backend.owner,
        prewarm_for="tree-run-0",
    )
    # What the backend asked for is what the API server kept (it adds defaults around it).
    for key, value in built["metadata"].items():
        assert stored["metadata"][key] == value, key
    [container], [asked] = stored["spec"]["containers"], built["spec"]["containers"]
    assert container["command"] == asked["command"] and container["env"] == asked["env"]
    assert container["securityContext"] == asked["securityContext"]
    assert stored["spec"]["automountServiceAccountToken"] is False
    assert backend.alive() == [handle]
    second = await backend.start_worker(BIGGER)
    assert second.worker_id == worker_pod_name(backend.owner["uid"], BIGGER, 1)
    assert backend.alive() == [handle, second]
    assert await backend.reap() == []


async def test_worker_pods_carry_the_runs_disk_and_time_limits(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    """The backend's ephemeral storage and deadline reach the Pod the API server keeps."""
    backend = await make_backend(ephemeral_storage_mib=256, active_deadline_s=720)
    handle = await backend.start_worker(BIG)
    stored = local_cluster.get("pod", handle.worker_id, namespace)
    assert stored is not None
    assert stored["spec"]["activeDeadlineSeconds"] == 720
    [container] = stored["spec"]["containers"]
    assert container["resources"]["limits"]["ephemeral-storage"] == "256Mi"
    assert container["resources"]["requests"]["ephemeral-storage"] == "256Mi"
    assert stored["spec"]["volumes"][0]["emptyDir"] == {"sizeLimit": "256Mi"}


@pytest.mark.parametrize(("phase", "code"), [("Failed", 3), ("Succeeded", 0)])
async def test_reap_reports_an_ended_pod_once_with_its_exit_code(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str, phase: str, code: int
) -> None:
    ended = await backend.start_worker(BIG)
    running = await backend.start_worker(BIG)
    set_status(local_cluster, namespace, ended.worker_id, terminated(phase, code))
    assert await backend.reap() == [WorkerExit(ended, code)]
    assert await backend.reap() == []
    assert backend.alive() == [running]
    # A failed Pod stays for `kubectl logs`; a succeeded one has nothing to tell.
    kept = local_cluster.get("pod", ended.worker_id, namespace)
    assert (kept is not None) == (phase == "Failed")


async def test_reap_reports_a_container_killed_for_memory(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    handle = await backend.start_worker(BIG)
    set_status(local_cluster, namespace, handle.worker_id, terminated("Failed", 137, "OOMKilled"))
    assert await backend.reap() == [WorkerExit(handle, 137, oom_killed=True)]


async def test_reap_reports_an_ended_pod_without_container_status_with_no_code(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    handle = await backend.start_worker(BIG)
    set_status(local_cluster, namespace, handle.worker_id, {"phase": "Failed"})
    assert await backend.reap() == [WorkerExit(handle, None)]


async def test_reap_reports_a_vanished_pod(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    handle = await backend.start_worker(BIG)
    local_cluster.kubectl("delete", "pod", handle.worker_id, "-n", namespace, "--grace-period=0")
    assert await backend.reap() == [WorkerExit(handle, None)]
    assert await backend.reap() == []
    assert backend.alive() == []


async def test_discard_deletes_the_pod_and_is_idempotent(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    handle = await backend.start_worker(BIG)
    await backend.discard(handle.worker_id)
    wait_for(lambda: local_cluster.get("pod", handle.worker_id, namespace) is None, 30, "the Pod")
    await backend.discard(handle.worker_id)  # already gone: still success
    assert await backend.reap() == [WorkerExit(handle, None)]
    assert backend.alive() == []


async def test_stop_all_removes_every_pod_of_the_pool_and_only_those(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    backend = await make_backend()
    other = await make_backend(pool="wf-other", owner={"name": "other", "uid": "9" * 32})
    mine = [await backend.start_worker(memory) for memory in (BIG, BIGGER, BIG)]
    theirs = await other.start_worker(BIG)
    assert backend.alive() == mine  # the other pool's Pod is never taken for a worker
    await backend.stop_all()
    wait_for(lambda: set(pods(local_cluster, namespace)) == {theirs.worker_id}, 30, "the pool")
    await backend.stop_all()  # nothing left: still success
    assert await backend.reap() == [WorkerExit(handle, None) for handle in mine]
    assert await other.reap() == []


async def test_creating_a_pod_that_exists_is_success(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    assert await backend.reap() == []  # the backend has seen the (empty) pool
    assert backend.owner is not None
    name = worker_pod_name(backend.owner["uid"], BIG, 0)
    existing = build_worker_pod(
        name=name,
        namespace=namespace,
        run_id="tree-run-1",
        pool="wf-tree",
        memory_mib=BIG,
        image=IMAGE,
        redis_url_secret=SECRET,
        idle_timeout_s=30.0,
        spawned_at=1.0,
    )
    local_cluster.apply(existing, namespace)  # e.g. a create whose answer was lost, retried
    handle = await backend.start_worker(BIG)
    assert handle.worker_id == name
    assert backend.alive() == [handle]
    assert await backend.reap() == []
    assert list(pods(local_cluster, namespace)) == [name]


async def test_a_name_taken_by_another_pool_is_an_error_not_an_adoption(
    backend: KubernetesBackend, local_cluster: Kube, namespace: str
) -> None:
    assert await backend.reap() == []
    assert backend.owner is not None
    name = worker_pod_name(backend.owner["uid"], BIG, 0)
    foreign = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": "x"}},
        "spec": {"containers": [{"name": "x", "image": "busybox", "command": ["sleep", "60"]}]},
    }
    local_cluster.apply(foreign, namespace)
    with pytest.raises(KubernetesBackendError, match=r"dagkube\.io/pool=None, not 'wf-tree'"):
        await backend.start_worker(BIG)
    assert backend.alive() == []


async def test_a_restarted_backend_adopts_the_pool_and_continues_its_names(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    before = await make_backend()
    first = await before.start_worker(BIG)
    after = await make_backend()  # same owner: e.g. the operator restarted
    assert await after.reap() == []
    assert after.alive() == [first]
    second = await after.start_worker(BIG)
    assert second.worker_id == worker_pod_name(after.owner["uid"], BIG, 1)
    assert set(pods(local_cluster, namespace)) == {first.worker_id, second.worker_id}


async def test_shared_pool_without_owner_names_pods_from_namespace_and_pool(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    backend = await make_backend(owner=None, run_id=None, pool="shared-pool")
    handle = await backend.start_worker(BIG)
    stored = local_cluster.get("pod", handle.worker_id, namespace)
    assert stored is not None
    assert "ownerReferences" not in stored["metadata"]
    assert stored["metadata"]["labels"]["dagkube.io/run"] == "shared"
    again = await make_backend(owner=None, run_id=None, pool="shared-pool")
    assert (await again.start_worker(BIG)).worker_id != handle.worker_id


async def test_a_create_the_api_server_refuses_names_the_namespace_and_the_reason(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    """A ServiceAccount without a RoleBinding: RBAC's own 403, as an operator would meet it."""
    local_cluster.kubectl("create", "serviceaccount", "nobody", "-n", namespace)
    code, reply = local_cluster.request(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/nobody/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert code == 201, reply
    configuration = k8s.Configuration()
    configuration.host = local_cluster.state.api_url
    configuration.ssl_ca_cert = str(local_cluster.state.config.path("pki", "ca.crt"))
    configuration.api_key = {"BearerToken": reply["status"]["token"]}
    configuration.api_key_prefix = {"BearerToken": "Bearer"}
    backend = await make_backend(api=k8s.ApiClient(configuration))
    with pytest.raises(KubernetesBackendError) as info:
        await backend.start_worker(BIG)
    message = str(info.value)
    assert f"namespace {namespace!r}" in message
    assert "403 Forbidden" in message
    assert f'"system:serviceaccount:{namespace}:nobody" cannot list resource "pods"' in message
    assert backend.alive() == []


async def test_scaler_creates_one_pod_per_queued_invocation_and_waits_while_it_starts(
    make_backend: Any, local_cluster: Kube, namespace: str, redis_server: Any
) -> None:
    pool = f"k8s-{uuid.uuid4().hex[:8]}"
    keys = PoolKeys(pool)
    store = redis.asyncio.Redis.from_url(redis_server.url)
    backend = await make_backend(pool=pool)
    try:
        await store.sadd(keys.classes, BIG)
        await store.lpush(keys.queue(BIG), Invocation(run="r1", mem=BIG, roots=["t0"]).to_json())
        scaler = Scaler(store, pool, backend)
        await scaler.reconcile()
        created = pods(local_cluster, namespace)
        assert [p["metadata"]["labels"]["dagkube.io/class"] for p in created.values()] == ["64Gi"]
        # Nothing runs it (no node fits it), so it never registers in Redis: still starting.
        await scaler.reconcile()
        assert list(pods(local_cluster, namespace)) == list(created)
        assert scaler.workers_started == 1
    finally:
        await store.delete(keys.classes, keys.queue(BIG))
        await store.aclose()


async def test_a_shared_pools_pods_go_with_its_configmap(
    make_backend: Any, local_cluster: Kube, namespace: str
) -> None:
    """The operator's shared pools: Pods owned by the pool's ConfigMap, named from its uid,
    labeled with the run they were created for, garbage-collected when it is deleted."""
    pool = f"{namespace}.wp-0123456789"
    name = "dagkube-worker-pool-wp-0123456789"
    local_cluster.apply(
        build_pool_object(name=name, namespace=namespace, pool=pool, settings={}), namespace
    )
    stored_object = local_cluster.get("configmap", name, namespace)
    assert stored_object is not None
    uid = stored_object["metadata"]["uid"]
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": uid}
    backend = await make_backend(pool=pool, owner=owner, run_id=None)
    handle = await backend.start_worker(BIG, demand_for=f"{namespace}.first-run")
    assert handle.worker_id == worker_pod_name(uid, BIG, 0)
    stored = local_cluster.get("pod", handle.worker_id, namespace)
    assert stored is not None
    [reference] = stored["metadata"]["ownerReferences"]
    assert (reference["kind"], reference["uid"]) == ("ConfigMap", uid)
    assert stored["metadata"]["labels"]["dagkube.io/run"] == "first-run"
    local_cluster.kubectl("delete", "configmap", name, "-n", namespace)
    wait_for(
        lambda: handle.worker_id not in pods(local_cluster, namespace),
        60,
        "the garbage collector to delete the pool's Pod with its ConfigMap",
    )
