"""Worker pools shared by the Workflows of a namespace, and the one scaler of each.

Workflows whose worker Pods would be identical (:class:`~dagkube_operator.runs.PoolSettings`)
share a pool: its Pods serve any run of the pool (the scaler's queues and idle sets are the
pool's), so the idle Pods one Workflow leaves serve the next one as warm starts, until they
exit by themselves after the idle timeout. The Pods are owned by a ConfigMap standing for
the pool (created on demand; deleting it, or the namespace, garbage-collects them) and named
from its uid, so an operator that restarts names and adopts the same Pods.

One scaler per pool runs inside the operator: started by the pool's first run, kept while
runs use the pool and, after the last one ended, while its idle Pods live (at most the idle
timeout and a grace); then stopped, Pods still there deleted (they are not idle workers: a
Pending Pod, a stuck one), Failed ones kept for ``kubectl logs``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client

from dagkube.kubernetes.backend import KubernetesBackend, KubernetesBackendError
from dagkube.kubernetes.pods import LABEL_RUN, build_pool_object
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.scaler import Scaler, WorkerHandle
from dagkube.store.keys import PoolKeys, local_part, namespace_of, worker_proc, worker_task
from dagkube_operator.metrics import OperatorMetrics
from dagkube_operator.runs import PoolSettings, pool_object_name

# After its last run, a pool's scaler waits this long past the idle timeout for its idle Pods
# to exit (and deletes their ended Pods) before it stops.
LINGER_GRACE_S = 10.0
LINGER_CHECK_S = 1.0

log = logging.getLogger("dagkube.operator")


class CountingBackend(KubernetesBackend):
    """The Kubernetes backend, counting the Pods it creates into the operator's metrics."""

    metrics: OperatorMetrics

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        try:
            handle = await super().start_worker(memory_mib, prewarm_for, demand_for)
        except KubernetesBackendError:
            self.metrics.api_errors.labels("create_pod").inc()
            raise
        self.metrics.pods_created.labels(f"{memory_mib}Mi").inc()
        if prewarm_for:
            self.metrics.pods_prewarmed.inc()
        return handle


@dataclass
class _LivePool:
    """A pool whose scaler runs: the runs using it (run id -> its maxWorkers)."""

    backend: CountingBackend
    scaler: Scaler
    scaling: asyncio.Task[None]
    runs: dict[str, int] = field(default_factory=dict)
    lingering: asyncio.Task[None] | None = None


async def idle_workers(redis: Any, pool: str) -> dict[int, int]:
    """The idle workers of ``pool`` per class now: the warm starts a new run can count on."""
    keys = PoolKeys(pool)
    classes = sorted(int(c) for c in await redis.smembers(keys.classes))
    async with redis.pipeline(transaction=False) as pipe:
        for memory in classes:
            pipe.scard(keys.idle(memory))
        counts = await pipe.execute()
    return {m: n for m, n in zip(classes, counts, strict=True) if n}


@dataclass
class SharedPools:
    """The operator's live pools, by pool id; :meth:`acquire` and :meth:`release` bracket each
    run's use of its pool."""

    api: client.ApiClient
    redis: Any
    metrics: OperatorMetrics
    redis_ca_secret: tuple[str, str] | None = None
    _live: dict[str, _LivePool] = field(init=False, default_factory=dict)
    _lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def backend(
        self,
        *,
        namespace: str,
        pool: str,
        settings: PoolSettings,
        owner: dict[str, Any] | None,
        redis_url_secret: tuple[str, str],
    ) -> CountingBackend:
        """The backend of a pool's Pods (no I/O): shaped by ``settings``, owned by ``owner``;
        its cap is set by the runs that use it."""
        backend = CountingBackend(
            self.api,
            namespace=namespace,
            pool=pool,
            image=settings.image,
            redis_url_secret=redis_url_secret,
            redis_ca_secret=self.redis_ca_secret,
            max_workers=0,
            owner=owner,
            idle_timeout_s=settings.idle_timeout_s,
            memory_per_cpu_mib=settings.memory_per_cpu_mib,
            max_cpu=settings.max_cpu,
            startup_delay_s=settings.startup_delay_s,
            ephemeral_storage_mib=settings.ephemeral_storage_mib,
        )
        backend.metrics = self.metrics
        return backend

    async def acquire(
        self,
        *,
        namespace: str,
        pool: str,
        settings: PoolSettings,
        run_id: str,
        max_workers: int,
        redis_url_secret: tuple[str, str],
    ) -> CountingBackend:
        """Join ``run_id`` to its pool, starting the pool's scaler when it is not running;
        the pool's backend. The pool's cap is the sum of its runs' ``max_workers``: a run
        alone in its pool gets exactly its own, runs at once together what they would get
        apart (idle Pods already alive may serve a run beyond its own: they cost no start)."""
        async with self._lock:
            live = self._live.get(pool)
            if live is None:
                owner = await self._pool_object(namespace, pool, settings)
                backend = self.backend(
                    namespace=namespace,
                    pool=pool,
                    settings=settings,
                    owner=owner,
                    redis_url_secret=redis_url_secret,
                )
                scaler = Scaler(self.redis, pool, backend)
                scaling = asyncio.create_task(scaler.run(), name=f"scaler {pool}")
                live = self._live[pool] = _LivePool(backend, scaler, scaling)
                self.metrics.live_pools[pool] = backend  # its live state on /metrics
                log.info("pool %s: scaler started (Pods owned by ConfigMap %s)", pool,
                         owner["name"])  # fmt: skip
            if live.lingering is not None:
                live.lingering.cancel()
                live.lingering = None
            live.runs[run_id] = max_workers
            live.backend.max_workers = sum(live.runs.values())
            return live.backend

    async def release(self, pool: str, run_id: str, *, linger: bool) -> None:
        """``run_id`` no longer uses its pool. The last run out leaves the scaler running while
        the idle Pods live (``linger``: the run ended) or stops it now (its follower stops:
        operator shutdown, Workflow deleted; the next scaler adopts the Pods)."""
        async with self._lock:
            live = self._live.get(pool)
            if live is None or live.runs.pop(run_id, None) is None:
                return
            live.backend.max_workers = sum(live.runs.values())
            if live.runs:
                return
            if linger:
                live.lingering = asyncio.create_task(
                    self._linger(pool, live), name=f"linger {pool}"
                )
                return
            del self._live[pool]
            self.metrics.live_pools.pop(pool, None)
        await _stop(pool, live, self.metrics)

    async def close(self) -> None:
        """Stop every pool's scaler (operator shutdown); their Pods stay for the next one."""
        async with self._lock:
            pools, self._live = self._live, {}
        for pool, live in pools.items():
            self.metrics.live_pools.pop(pool, None)
            if live.lingering is not None:
                live.lingering.cancel()
            await _stop(pool, live, self.metrics)

    async def _linger(self, pool: str, live: _LivePool) -> None:
        """Keep the scaler of a pool without runs while its idle Pods live (they exit by
        themselves after the idle timeout, and the scaler deletes their ended Pods); then stop
        it and delete what is left but Failed Pods."""
        until = time.monotonic() + live.backend.idle_timeout_s + LINGER_GRACE_S
        while time.monotonic() < until and live.backend.alive():
            await asyncio.sleep(LINGER_CHECK_S)
        async with self._lock:
            if live.runs or self._live.get(pool) is not live:
                return  # a run joined meanwhile
            del self._live[pool]
            self.metrics.live_pools.pop(pool, None)
        await _stop(pool, live, self.metrics)
        try:
            await remove_pods(live.backend, metrics=self.metrics)
        except Exception as exc:  # no caller to raise to: said and counted
            self.metrics.reconcile_errors.inc()
            log.error("pool %s: cannot remove its last Pods: %s", pool, exc, exc_info=exc)
        log.info("pool %s: no runs and no idle Pods left: scaler stopped", pool)

    async def _pool_object(
        self, namespace: str, pool: str, settings: PoolSettings
    ) -> dict[str, Any]:
        """The ConfigMap owning the pool's Pods, created when absent; its owner reference."""
        core: Any = client.CoreV1Api(self.api)
        name = pool_object_name(pool)
        body = build_pool_object(
            name=name, namespace=namespace, pool=pool, settings=dataclasses.asdict(settings)
        )
        try:
            found = await core.create_namespaced_config_map(namespace, body)
        except client.ApiException as exc:
            if exc.status != 409:
                self.metrics.api_errors.labels("create_pool_object").inc()
                raise
            found = await core.read_namespaced_config_map(name, namespace)
        return {"apiVersion": "v1", "kind": "ConfigMap", "name": name, "uid": found.metadata.uid}

    async def make_room(self, namespace: str, *, beside: tuple[str, int] | None = None) -> int:
        """Ask the idle workers of the namespace's live pools to exit, as a Pod there (a build
        Pod, a worker Pod of class ``beside[1]`` in pool ``beside[0]``) has no node with room:
        idle Pods outlive their run and hold their node's memory. A worker Pod's own pool
        keeps its idle workers of that class (they would have served it). The workers asked."""
        asked = 0
        for pool in [p for p in self._live if namespace_of(p) == namespace]:
            keep = beside[1] if beside is not None and beside[0] == pool else None
            asked += await retire_idle_beside(self.redis, pool, keep)
        return asked

    def live_backend(self, pool: str) -> CountingBackend | None:
        """The backend of a pool whose scaler runs now, None otherwise."""
        live = self._live.get(pool)
        return live.backend if live is not None else None


async def _stop(pool: str, live: _LivePool, metrics: OperatorMetrics) -> None:
    """Stop a pool's scaler and wait for it; an error of the scaler (a bug: it retries its
    own) is logged and counted, not raised into the caller's cleanup."""
    live.scaler.stop()
    live.scaling.cancel()
    try:
        with contextlib.suppress(asyncio.CancelledError):
            await live.scaling
    except Exception as exc:
        metrics.reconcile_errors.inc()
        log.error("pool %s: the scaler failed: %s", pool, exc, exc_info=exc)


async def remove_pods(
    backend: KubernetesBackend,
    *,
    metrics: OperatorMetrics,
    phases: Collection[str] | None = None,
    run_id: str | None = None,
) -> None:
    """Delete the pool's Pods in one of ``phases`` (None: all but Failed ones, kept for
    ``kubectl logs``); with ``run_id``, only those created for that run (``dagkube.io/run``)."""
    try:
        pods = await backend.pods()
        doomed = [
            name
            for name, pod in pods.items()
            if _in_phases((pod.get("status") or {}).get("phase") or "Pending", phases)
            and (run_id is None or pod["metadata"]["labels"].get(LABEL_RUN) == local_part(run_id))
        ]
        await asyncio.gather(*(backend.discard(name) for name in doomed))
    except KubernetesBackendError as exc:
        metrics.api_errors.labels("delete_pods").inc()
        log.warning("cannot remove the worker Pods of pool %s: %s", backend.pool, exc)


def _in_phases(phase: str, phases: Collection[str] | None) -> bool:
    return phase != "Failed" if phases is None else phase in phases


async def stop_busy_workers(redis: Any, backend: KubernetesBackend, run_id: str) -> list[str]:
    """Delete the Pods still in a task of the ended run ``run_id`` (a task past the run's
    deadline would keep its Pod from serving anyone else); the work they hold is dropped
    first, so that it is not re-queued for a run that has ended. The Pods deleted."""
    pool = backend.pool
    registered = [w.decode() for w in await redis.hkeys(PoolKeys(pool).workers)]
    if not registered:
        return []
    async with redis.pipeline(transaction=False) as pipe:  # GETs: the operator's ACL has them
        for worker in registered:
            pipe.get(worker_task(worker, pool))
        claims = await pipe.execute()
    busy = [
        worker
        for worker, claim in zip(registered, claims, strict=True)
        if claim is not None and json.loads(claim).get("run") == run_id
    ]
    for worker in busy:
        await redis.delete(worker_proc(worker, pool))
        await backend.discard(worker)
    if busy:
        log.info("run %s ended: deleted the Pods still in its tasks: %s", run_id, busy)
    return busy


async def retire_idle_beside(redis: Any, pool: str, memory_mib: int | None) -> int:
    """Ask the pool's idle workers (beyond those their queues wait for) to exit, those of class
    ``memory_mib`` excepted (None: every class): a Pod that no node has room for may fit once
    they are gone (idle Pods outlive their run and hold their node's memory). Repeating it
    asks no more of them: retire requests already queued count. The workers asked."""
    keys = PoolKeys(pool)
    classes = sorted(int(c) for c in await redis.smembers(keys.classes) if int(c) != memory_mib)
    asked = 0
    for other in classes:
        spare = await redis.scard(keys.idle(other)) - await redis.llen(keys.queue(other))
        for _ in range(max(0, spare)):
            retire = Invocation(run="", mem=other, retire=True).to_json()
            await redis.lpush(keys.queue(other), retire)
            asked += 1
    if asked:
        log.info("pool %s: %d idle worker(s) asked to exit to make room", pool, asked)
    return asked
