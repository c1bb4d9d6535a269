"""Shared worker pools: which Workflows share one, how its Pods are owned and named, and what a
run's end frees in it (against a real Redis)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from typing import Any

import redis.asyncio

from dagkube.kubernetes.pods import (
    LABEL_POOL,
    LABEL_RUN,
    build_pool_object,
    build_worker_pod,
    pool_label,
    worker_pod_name,
    worker_pod_serial,
)
from dagkube.store.keys import PoolKeys, local_part, namespace_of, worker_proc, worker_task
from dagkube_operator.config import OperatorConfig
from dagkube_operator.core import Operator
from dagkube_operator.pools import idle_workers, stop_busy_workers
from dagkube_operator.runs import PoolSettings, pool_for, pool_object_name
from dagkube_operator.spec import parse_spec

BASE = PoolSettings(
    image="worker:1",
    memory_per_cpu_mib=1792,
    max_cpu=6.0,
    idle_timeout_s=30.0,
    startup_delay_s=0.0,
    ephemeral_storage_mib=1024,
)
POOL_OBJECT_UID = "6c1f0e2a-93b1-4a7e-9d55-0123456789ab"


def _operator() -> Operator:
    return Operator(config=OperatorConfig(redis_url="redis://r:6379/0"), redis=None, api=None)  # type: ignore[arg-type]


def test_workflows_whose_pods_would_be_equal_share_a_pool() -> None:
    operator = _operator()
    source = {"source": {"ref": {"dag": "0123456789abcdef"}}}
    plain = parse_spec(source)
    # Per-run settings leave the Pods as they are: the same pool.
    per_run = parse_spec(
        {
            **source,
            "timeoutSeconds": 60,
            "resources": {"maxWorkers": 3, "classes": ["1Gi"]},
            "planner": {"name": "uniform", "sla": "p90"},
        }
    )
    assert pool_for("team-a", operator.pool_settings(plain)) == pool_for(
        "team-a", operator.pool_settings(per_run)
    )
    # Each Pod-shaping setting makes another pool, and so does another namespace.
    shaped = [
        parse_spec({**source, "image": "ghcr.io/acme/worker:2"}),
        parse_spec({**source, "resources": {"memoryPerCpu": "1Gi"}}),
        parse_spec({**source, "resources": {"maxCpu": 0.5}}),
    ]
    pools = {pool_for("team-a", operator.pool_settings(s)) for s in [plain, *shaped]}
    assert len(pools) == 4
    assert pool_for("team-b", operator.pool_settings(plain)) not in pools
    for field in ("idle_timeout_s", "startup_delay_s", "ephemeral_storage_mib"):
        changed = dataclasses.replace(BASE, **{field: getattr(BASE, field) * 2 + 1})
        assert changed.digest != BASE.digest, field


def test_a_pool_id_is_stable_and_fits_labels_and_names() -> None:
    pool = pool_for("team-a", BASE)
    assert pool == pool_for("team-a", dataclasses.replace(BASE))  # no randomness
    assert pool == pool_for("team-a", dataclasses.replace(BASE, max_cpu=6, idle_timeout_s=30))
    assert namespace_of(pool) == "team-a"
    assert local_part(pool) == f"wp-{BASE.digest}" and len(BASE.digest) == 10
    assert pool_label(pool) == local_part(pool)
    assert pool_object_name(pool) == f"dagkube-worker-pool-wp-{BASE.digest}"


def test_pool_object_owns_the_pods_and_names_them() -> None:
    pool = pool_for("team-a", BASE)
    config_map = build_pool_object(
        name=pool_object_name(pool),
        namespace="team-a",
        pool=pool,
        settings=dataclasses.asdict(BASE),
    )
    assert config_map["kind"] == "ConfigMap"
    assert config_map["metadata"]["labels"][LABEL_POOL] == pool_label(pool)
    assert json.loads(config_map["data"]["settings.json"])["image"] == "worker:1"
    owner = {"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": POOL_OBJECT_UID}
    name = worker_pod_name(POOL_OBJECT_UID, 512, 3)
    assert name == "dk-6c1f0e2a-512-3" and worker_pod_serial(name, POOL_OBJECT_UID) == 3
    pod = build_worker_pod(
        name=name,
        namespace="team-a",
        run_id="team-a.first-1a2b3c4d",
        pool=pool,
        memory_mib=512,
        image=BASE.image,
        redis_url_secret=("s", "url"),
        idle_timeout_s=BASE.idle_timeout_s,
        spawned_at=0.0,
        owner=owner,
    )
    [reference] = pod["metadata"]["ownerReferences"]
    assert reference == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "x",
        "uid": POOL_OBJECT_UID,
        "controller": True,
    }  # no blockOwnerDeletion: nothing waits for a pool's Pods
    assert pod["metadata"]["labels"][LABEL_RUN] == "first-1a2b3c4d"
    assert "activeDeadlineSeconds" not in pod["spec"]
    workflow_owned = build_worker_pod(
        **{**_pod_args(pool), "owner": {"name": "wf", "uid": POOL_OBJECT_UID}}
    )
    [reference] = workflow_owned["metadata"]["ownerReferences"]
    assert (reference["kind"], reference["blockOwnerDeletion"]) == ("Workflow", True)


def _pod_args(pool: str) -> dict[str, Any]:
    return {
        "name": "dk-6c1f0e2a-512-0",
        "namespace": "team-a",
        "run_id": None,
        "pool": pool,
        "memory_mib": 512,
        "image": "worker:1",
        "redis_url_secret": ("s", "url"),
        "idle_timeout_s": 30.0,
        "spawned_at": 0.0,
    }


class DeletingBackend:
    """The two things stop_busy_workers asks of a backend: its pool, and deleting a Pod."""

    def __init__(self, pool: str) -> None:
        self.pool = pool
        self.deleted: list[str] = []

    async def discard(self, worker_id: str) -> None:
        self.deleted.append(worker_id)


def test_a_runs_end_frees_only_the_workers_in_its_tasks(redis_server: Any) -> None:
    pool = pool_for("team-a", BASE)
    keys = PoolKeys(pool)
    ended, other = "team-a.first-1a2b3c4d", "team-a.second-5e6f7a8b"

    async def scenario() -> tuple[list[str], dict[int, int], list[str]]:
        store = redis.asyncio.Redis.from_url(redis_server.url)
        try:
            await store.hset(keys.workers, mapping={"busy": 512, "serving": 512, "idle": 512})
            await store.sadd(keys.classes, 512)
            await store.sadd(keys.idle(512), "idle")
            await store.set(worker_task("busy", pool), json.dumps({"run": ended, "task": "t"}))
            await store.set(worker_task("serving", pool), json.dumps({"run": other, "task": "u"}))
            await store.rpush(worker_proc("busy", pool), json.dumps({"run": ended}))
            await store.rpush(worker_proc("serving", pool), json.dumps({"run": other}))
            warm = await idle_workers(store, pool)
            backend = DeletingBackend(pool)
            busy = await stop_busy_workers(store, backend, ended)  # type: ignore[arg-type]
            assert backend.deleted == busy
            held = [w for w in ("busy", "serving") if await store.llen(worker_proc(w, pool))]
            return busy, warm, held
        finally:
            await store.delete(keys.workers, keys.classes, keys.idle(512))
            await store.delete(*(worker_task(w, pool) for w in ("busy", "serving")))
            await store.delete(*(worker_proc(w, pool) for w in ("busy", "serving")))
            await store.aclose()

    busy, warm, held = asyncio.run(scenario())
    assert busy == ["busy"]  # the worker serving another run and the idle one stay
    assert warm == {512: 1}  # what the next run's planner counts as warm starts
    assert held == ["serving"]  # the ended run's held work is not re-queued
