"""The scaler: turns queued invocations into workers through a Backend, never over-creating.

Demand per class = queued invocations - idle workers - workers still starting; the cap counts
workers that are not blocked waiting for inputs. The same scaler
runs inside ``dagkube run`` (LocalBackend) and inside the operator (KubernetesBackend). It also
re-queues the held work of workers that died (process exit seen by the backend, or heartbeat
expired) and, at the worker cap, retires an idle worker of another class to make room.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError

from dagkube.runtime.invocation import Invocation
from dagkube.store.calls import AddToRunCall, RequeueCall
from dagkube.store.connection import ServerReplaced
from dagkube.store.keys import PoolKeys, worker_heartbeat, worker_proc, worker_task
from dagkube.store.scripts import Scripts

log = logging.getLogger("dagkube.scaler")

# A task whose worker died this many times (for any reason but memory) fails the run: a task
# that crashes its interpreter must not be re-queued forever.
MAX_REQUEUES = 3
# A worker past its task's deadline stops itself; one that has not this long after it (its
# event loop starved by the task) is stopped by the scaler.
TIMEOUT_GRACE_S = 5.0


@dataclass
class WorkerHandle:
    """What a backend knows of a worker it created."""

    worker_id: str
    memory_mib: int
    spawned_at: float


@dataclass(frozen=True)
class WorkerExit:
    """A worker that ended, as its backend saw it. ``code``: the exit code (None: unknown,
    e.g. a Pod that vanished); ``oom_killed``: the kernel killed it for exceeding its memory
    limit (a local cgroup's OOM kill, or a container that ended ``OOMKilled``);
    ``peak_memory_bytes``: the most memory it used, where the backend measured it."""

    handle: WorkerHandle
    code: int | None
    oom_killed: bool = False
    peak_memory_bytes: int | None = None


class Backend(Protocol):
    """Creates and watches workers: processes (LocalBackend) or Pods (KubernetesBackend)."""

    max_workers: int

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        """Create a worker of the class; ``prewarm_for`` names the run whose pre-warm request
        asked for it ahead of demand, ``demand_for`` the run whose queued invocation it was
        created for. A worker that exits without serving anything charges its life to that
        run."""
        ...

    def alive(self) -> list[WorkerHandle]:
        """Workers created and not known to have exited."""
        ...

    async def reap(self) -> list[WorkerExit]:
        """Workers that exited since the last call, once each."""
        ...

    async def discard(self, worker_id: str) -> None:
        """Terminate a worker that is no longer trusted (its heartbeat expired)."""
        ...

    async def stop_all(self) -> None: ...


class Scaler:
    def __init__(
        self,
        redis: Any,
        pool: str,
        backend: Backend,
        *,
        heartbeat_check_s: float = 2.0,
        tick_s: float = 0.5,
    ) -> None:
        self.redis = redis
        self.keys = PoolKeys(pool)
        self.backend = backend
        self.heartbeat_check_s = heartbeat_check_s
        self.tick_s = tick_s
        self._scripts = Scripts(redis)
        self._last_heartbeat_check = 0.0
        self._stopped = asyncio.Event()
        self.workers_started = 0
        self.workers_lost = 0

    async def run(self) -> None:
        """Reconcile whenever something is queued or a worker leaves (blocking on the wake
        list), and at least every ``tick_s`` to notice exits and expired heartbeats."""
        failures = 0
        while not self._stopped.is_set():
            try:
                await self.reconcile()
                await self.redis.blpop(self.keys.wake, timeout=await self._next_wait_s())
                failures = 0
            except asyncio.CancelledError:
                raise
            except ServerReplaced as exc:
                # Its state may be behind what this scaler did: whoever owns the runs decides
                # (the local driver fails them); nothing here is reconciled with it.
                log.error("scaler: %s; stopping", exc)
                return
            except (RedisError, OSError) as exc:
                if self._stopped.is_set():
                    return  # its connection was closed under it: the runtime is closing
                failures += 1
                log.warning("scaler: Redis call failed (%s); retrying", exc or type(exc).__name__)
                await asyncio.sleep(min(0.1 * 2**failures, 5.0))
            except Exception:
                log.exception("scaler: reconcile failed; retrying")
                await asyncio.sleep(self.tick_s)

    def stop(self) -> None:
        self._stopped.set()

    async def reconcile(self) -> None:
        for ended in await self.backend.reap():
            await self._on_exit(ended)
        now = time.monotonic()
        if now - self._last_heartbeat_check >= self.heartbeat_check_s:
            self._last_heartbeat_check = now
            await self._check_heartbeats()
        await self._prewarm()
        await self._scale()

    async def _next_wait_s(self) -> float:
        """Until the next reconcile: the tick, or sooner if a pre-warm request falls due."""
        head = await self.redis.zrange(self.keys.prewarm, 0, 0, withscores=True)
        if not head:
            return self.tick_s
        return min(self.tick_s, max(0.01, head[0][1] - time.time()))

    async def _prewarm(self) -> None:
        """Pre-scale: create the workers that due pre-warm requests ask for (within the cap),
        ahead of the demand they anticipate; counted in the requesting run's metrics."""
        due = await self.redis.zrangebyscore(self.keys.prewarm, "-inf", time.time())
        if not due:
            return
        await self.redis.zrem(self.keys.prewarm, *due)
        room = self.backend.max_workers - await self._active()
        for raw in due:
            request = json.loads(raw)
            started = 0
            for _ in range(min(int(request["count"]), max(0, room))):
                await self.backend.start_worker(int(request["mem"]), prewarm_for=request["run"])
                self.workers_started += 1
                started += 1
            room -= started
            await self._scripts.add_to_run(
                AddToRunCall(
                    run_id=request["run"],
                    increments={"prewarm_requested": request["count"], "prewarm_started": started},
                )
            )
            log.info(
                "pre-warm for run %s (trigger %s): %d of %d worker(s) of %d MiB started",
                request["run"],
                request["trigger"],
                started,
                request["count"],
                request["mem"],
            )

    async def _active(self) -> int:
        """Workers that count against the cap: alive and not blocked waiting for inputs."""
        alive = {h.worker_id for h in self.backend.alive()}
        waiting = {w.decode() for w in await self.redis.smembers(self.keys.waiting)}
        return len(alive) - len(waiting & alive)

    async def _on_exit(self, ended: WorkerExit) -> None:
        """Re-queue what the worker held: one class up if it was killed for memory; the
        REQUEUE script fails the run instead at the largest class, or when the same task has
        lost its worker more than ``MAX_REQUEUES`` times."""
        handle = ended.handle
        held = await self.redis.llen(worker_proc(handle.worker_id, self.keys.pool))
        reply = await self._scripts.requeue(
            RequeueCall(
                pool=self.keys.pool,
                worker_id=handle.worker_id,
                memory_mib=handle.memory_mib,
                spawned_at=handle.spawned_at,
                now=time.time(),
                oom_killed=ended.oom_killed,
                peak_memory_bytes=ended.peak_memory_bytes,
                exit_code=ended.code,
                max_requeues=MAX_REQUEUES,
            )
        )
        requeued = reply.requeued
        if held:
            self.workers_lost += 1
            cause = "was killed for exceeding its memory" if ended.oom_killed else "exited"
            log.warning(
                "worker %s %s (code %s) holding %d invocation(s): %d re-queued%s",
                handle.worker_id,
                cause,
                ended.code,
                held,
                requeued,
                " one class up" if ended.oom_killed and requeued else "",
            )

    async def _check_heartbeats(self) -> None:
        """Workers registered in Redis but silent: lost (e.g. a Pod that vanished); and
        workers still in a task well past its timeout: stopped (REQUEUE sees the timeout)."""
        registered = await self.redis.hgetall(self.keys.workers)
        if not registered:
            return
        ids = list(registered)
        # Heartbeat and registration read together (MULTI): a worker that exits cleanly
        # removes both at once, after the HGETALL above; it is gone, not lost.
        async with self.redis.pipeline(transaction=True) as pipe:
            for worker_id in ids:
                pipe.exists(worker_heartbeat(worker_id.decode(), self.keys.pool))
                pipe.hexists(self.keys.workers, worker_id)
                pipe.get(worker_task(worker_id.decode(), self.keys.pool))
            answers = await pipe.execute()
        known = {h.worker_id: h for h in self.backend.alive()}
        now = time.time()
        for index, (worker_id, memory) in enumerate(registered.items()):
            wid = worker_id.decode()
            beat, still_registered, task = answers[3 * index : 3 * index + 3]
            if not still_registered:
                continue
            deadline = json.loads(task).get("deadline") if task else None
            if beat and (deadline is None or now < deadline + TIMEOUT_GRACE_S):
                continue
            handle = known.get(wid) or WorkerHandle(wid, int(memory), time.time())
            if beat and deadline is not None:
                log.warning(
                    "worker %s: still in its task %.1fs past its timeout", wid, now - deadline
                )
            else:
                log.warning("worker %s: heartbeat expired", wid)
            await self._on_exit(WorkerExit(handle, None))
            # Its work is re-queued: it must not finish anything later nor hold a slot.
            await self.backend.discard(wid)

    async def _scale(self) -> None:
        classes = sorted(int(c) for c in await self.redis.smembers(self.keys.classes))
        if not classes:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for memory in classes:
                pipe.llen(self.keys.queue(memory))
                pipe.scard(self.keys.idle(memory))
            counts = await pipe.execute()
        alive = self.backend.alive()
        registered = {w.decode() for w in await self.redis.hkeys(self.keys.workers)}
        # Bound workers blocked on their inbox use no CPU: they do not count against the cap.
        total = await self._active()
        for index, memory in enumerate(classes):
            queued, idle = counts[2 * index], counts[2 * index + 1]
            starting = sum(
                1 for h in alive if h.memory_mib == memory and h.worker_id not in registered
            )
            demand = queued - idle - starting
            if demand <= 0:
                continue
            room = self.backend.max_workers - total
            if room < demand:
                await self._make_room(memory, demand - max(room, 0), classes, counts)
            count = max(0, min(demand, room))
            for run in await self._runs_waiting(memory, count):
                await self.backend.start_worker(memory, demand_for=run)
                self.workers_started += 1
                total += 1

    async def _runs_waiting(self, memory: int, count: int) -> list[str | None]:
        """The runs of the ``count`` newest queued invocations of the class: older ones go to
        idle and starting workers first (the queue is taken from its oldest end)."""
        if count <= 0:
            return []
        raw = await self.redis.lrange(self.keys.queue(memory), 0, count - 1)
        runs: list[str | None] = [json.loads(item).get("run") or None for item in raw]
        return runs + [None] * (count - len(runs))

    async def _make_room(
        self, memory: int, wanted: int, classes: list[int], counts: list[int]
    ) -> None:
        """At the cap: ask idle workers of classes with nothing queued to exit."""
        for index, other in enumerate(classes):
            if other == memory or wanted <= 0:
                continue
            queued, idle = counts[2 * index], counts[2 * index + 1]
            spare = min(idle - queued, wanted)
            for _ in range(max(0, spare)):
                await self.redis.lpush(
                    self.keys.queue(other), Invocation(run="", mem=other, retire=True).to_json()
                )
                wanted -= 1
