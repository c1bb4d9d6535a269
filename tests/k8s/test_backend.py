"""KubernetesBackend against a real API emulator (kmock): the Pods it creates, reaps and deletes.

There is no kubelet here: a test plays its part by patching a Pod's status subresource or
deleting the Pod through the API.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import kmock
import pytest
import redis.asyncio

from dagkube.kubernetes.backend import KubernetesBackend, KubernetesBackendError, connect
from dagkube.kubernetes.pods import build_worker_pod, worker_pod_name
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.keys import PoolKeys
from dagkube.runtime.scaler import Scaler
from tests.k8s.kmock_env import EmulatedCluster, kubernetes_api, server_fields_removed, terminated

# kmock 0.8 loads its bundled API discovery with a deprecated importlib.resources call.
pytestmark = [
    pytest.mark.k8s,
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
]

NAMESPACE = "jobs"
IMAGE = "dagkube-worker:test"
SECRET = ("dagkube-redis", "url")


@pytest.fixture
async def cluster() -> AsyncIterator[EmulatedCluster]:
    async with kubernetes_api() as found:
        yield found


@pytest.fixture
async def make_backend(cluster: EmulatedCluster):
    """Build backends on API clients of their own (as separate operator processes would)."""
    clients = []

    async def make(**options: Any) -> KubernetesBackend:
        api = await connect(cluster.url)
        clients.append(api)
        options.setdefault("namespace", NAMESPACE)
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
async def backend(make_backend) -> KubernetesBackend:
    return await make_backend()


async def test_start_worker_creates_the_pod_the_builder_describes(backend, cluster):
    handle = await backend.start_worker(512, prewarm_for="tree-run-0")
    assert handle.worker_id == worker_pod_name(backend.owner["uid"], 512, 0)
    assert handle.memory_mib == 512
    stored = await cluster.pod(NAMESPACE, handle.worker_id)
    assert stored is not None
    # The API server adds a uid, timestamps, versions and the Pending status: not the backend's.
    assert server_fields_removed(stored) == build_worker_pod(
        name=handle.worker_id,
        namespace=NAMESPACE,
        run_id="tree-run-1",
        pool="wf-tree",
        memory_mib=512,
        image=IMAGE,
        redis_url_secret=SECRET,
        idle_timeout_s=30.0,
        spawned_at=handle.spawned_at,
        owner=backend.owner,
        prewarm_for="tree-run-0",
    )
    assert backend.alive() == [handle]
    second = await backend.start_worker(2048)
    assert second.worker_id == worker_pod_name(backend.owner["uid"], 2048, 1)
    assert backend.alive() == [handle, second]
    assert await backend.reap() == []


@pytest.mark.parametrize(("phase", "code"), [("Failed", 3), ("Succeeded", 0)])
async def test_reap_reports_an_ended_pod_once_with_its_exit_code(backend, cluster, phase, code):
    ended = await backend.start_worker(512)
    running = await backend.start_worker(512)
    await cluster.set_pod_status(NAMESPACE, running.worker_id, {"phase": "Running"})
    await cluster.set_pod_status(NAMESPACE, ended.worker_id, terminated(phase, code))
    assert await backend.reap() == [(ended, code)]
    assert await backend.reap() == []
    assert backend.alive() == [running]
    # A failed Pod stays for `kubectl logs`; a succeeded one has nothing to tell.
    kept = await cluster.pod(NAMESPACE, ended.worker_id)
    assert (kept is not None) == (phase == "Failed")


async def test_reap_reports_an_ended_pod_without_container_status_with_no_code(backend, cluster):
    handle = await backend.start_worker(1024)
    await cluster.set_pod_status(NAMESPACE, handle.worker_id, {"phase": "Failed"})
    assert await backend.reap() == [(handle, None)]


async def test_reap_reports_a_vanished_pod(backend, cluster):
    handle = await backend.start_worker(512)
    await cluster.delete_pod(NAMESPACE, handle.worker_id)
    assert await backend.reap() == [(handle, None)]
    assert await backend.reap() == []
    assert backend.alive() == []


async def test_discard_deletes_the_pod_and_is_idempotent(backend, cluster):
    handle = await backend.start_worker(512)
    await backend.discard(handle.worker_id)
    assert await cluster.pod(NAMESPACE, handle.worker_id) is None
    await backend.discard(handle.worker_id)  # already gone: still success
    assert await backend.reap() == [(handle, None)]
    assert backend.alive() == []


async def test_stop_all_removes_every_pod_of_the_pool_and_only_those(make_backend, cluster):
    backend = await make_backend()
    other = await make_backend(pool="wf-other", owner={"name": "other", "uid": "9" * 32})
    mine = [await backend.start_worker(memory) for memory in (512, 1024, 512)]
    theirs = await other.start_worker(512)
    assert backend.alive() == mine  # the other pool's Pod is never taken for a worker
    await backend.stop_all()
    assert set(await cluster.pods(NAMESPACE)) == {theirs.worker_id}
    await backend.stop_all()  # nothing left: still success
    assert await backend.reap() == [(handle, None) for handle in mine]
    assert await other.reap() == []


async def test_creating_a_pod_that_exists_is_success(backend, cluster):
    assert await backend.reap() == []  # the backend has seen the (empty) pool
    name = worker_pod_name(backend.owner["uid"], 512, 0)
    existing = build_worker_pod(
        name=name,
        namespace=NAMESPACE,
        run_id="tree-run-1",
        pool="wf-tree",
        memory_mib=512,
        image=IMAGE,
        redis_url_secret=SECRET,
        idle_timeout_s=30.0,
        spawned_at=1.0,
    )
    await cluster.create_pod(existing)  # e.g. a create whose answer was lost, then retried
    handle = await backend.start_worker(512)
    assert handle.worker_id == name
    assert backend.alive() == [handle]
    assert await backend.reap() == []
    assert list(await cluster.pods(NAMESPACE)) == [name]


async def test_a_name_taken_by_another_pool_is_an_error_not_an_adoption(backend, cluster):
    assert await backend.reap() == []
    name = worker_pod_name(backend.owner["uid"], 512, 0)
    foreign = {"metadata": {"name": name, "namespace": NAMESPACE, "labels": {"app": "x"}}}
    await cluster.create_pod(foreign)
    with pytest.raises(KubernetesBackendError, match=r"dagkube\.io/pool=None, not 'wf-tree'"):
        await backend.start_worker(512)
    assert backend.alive() == []


async def test_a_restarted_backend_adopts_the_pool_and_continues_its_names(make_backend, cluster):
    before = await make_backend()
    first = await before.start_worker(512)
    after = await make_backend()  # same owner: e.g. the operator restarted
    assert await after.reap() == []
    assert after.alive() == [first]
    second = await after.start_worker(512)
    assert second.worker_id == worker_pod_name(after.owner["uid"], 512, 1)
    assert set(await cluster.pods(NAMESPACE)) == {first.worker_id, second.worker_id}


async def test_shared_pool_without_owner_names_pods_from_namespace_and_pool(make_backend, cluster):
    backend = await make_backend(owner=None, run_id=None, pool="shared-pool")
    handle = await backend.start_worker(512)
    stored = await cluster.pod(NAMESPACE, handle.worker_id)
    assert stored is not None
    assert "ownerReferences" not in stored["metadata"]
    assert stored["metadata"]["labels"]["dagkube.io/run"] == "shared"
    again = await make_backend(owner=None, run_id=None, pool="shared-pool")
    assert (await again.start_worker(512)).worker_id != handle.worker_id


async def test_forbidden_create_names_the_namespace_and_the_reason(backend, cluster):
    cluster.emulator[kmock.action.CREATE, kmock.resource("v1/pods")] << kmock.KubernetesError(
        status=403,
        reason="Forbidden",
        message='pods is forbidden: User "system:serviceaccount:jobs:op" cannot create pods',
    )
    with pytest.raises(KubernetesBackendError) as info:
        await backend.start_worker(512)
    message = str(info.value)
    assert "namespace 'jobs'" in message
    assert "403 Forbidden: pods is forbidden" in message
    assert backend.alive() == []


@pytest.mark.integration
async def test_scaler_creates_one_pod_per_queued_invocation_and_waits_while_it_starts(
    make_backend, cluster, redis_server
):
    pool = f"k8s-{uuid.uuid4().hex[:8]}"
    keys = PoolKeys(pool)
    client = redis.asyncio.Redis.from_url(redis_server.url)
    backend = await make_backend(pool=pool)
    try:
        await client.sadd(keys.classes, 1024)
        await client.lpush(keys.queue(1024), Invocation(run="r1", mem=1024, roots=["t0"]).to_json())
        scaler = Scaler(client, pool, backend)
        await scaler.reconcile()
        pods = await cluster.pods(NAMESPACE)
        assert [pod["metadata"]["labels"]["dagkube.io/class"] for pod in pods.values()] == ["1Gi"]
        # No kubelet runs it, so it never registers in Redis: it is still starting.
        await scaler.reconcile()
        assert list(await cluster.pods(NAMESPACE)) == list(pods)
        assert scaler.workers_started == 1
    finally:
        await client.delete(keys.classes, keys.queue(1024))
        await client.aclose()
