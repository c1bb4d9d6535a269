"""The scaler: turns queued invocations into workers through a Backend, never over-creating.

Demand per class = queued invocations - idle workers - workers still starting; the cap counts
workers that are not blocked waiting for inputs. The same scaler
runs inside ``dagkube run`` (LocalBackend) and inside the operator (KubernetesBackend). It also
re-queues the held work of workers that died (process exit seen by the backend, or heartbeat
expired) and, at the worker cap, retires an idle worker of another class to make room.
Pre-warm requests (a sorted set scored by when they are due) become workers when due, unless
their run ended (dropped at once, due or not) or idle workers will take the demand anyway.
A request is added by the worker running its trigger task, or by the driver at submission
when it is due before that task can start (:func:`prewarm_entry` is the one format both use).
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
from dagkube.store.connection import MIN_BLOCK_S, ServerReplaced
from dagkube.store.keys import PoolKeys, RunKeys, worker_heartbeat, worker_proc, worker_task
from dagkube.store.records import RunStatus
from dagkube.store.scripts import Scripts

log = logging.getLogger("dagkube.scaler")

# A task whose worker died this many times (for any reason but memory) fails the run: a task
# that crashes its interpreter must not be re-queued forever.
MAX_REQUEUES = 3
# A worker past its task's deadline stops itself; one that has not this long after it (its
# event loop starved by the task) is stopped by the scaler.
TIMEOUT_GRACE_S = 5.0


def prewarm_entry(run_id: str, memory_mib: int, count: int, trigger: str) -> str:
    """One pre-warm request as a member of the pool's sorted set. The same request added
    twice (at submission and again at its trigger's start, or by a re-run trigger) is the same
    member, so the scaler serves it once."""
    entry = {"run": run_id, "mem": memory_mib, "count": count, "trigger": trigger}
    return json.dumps(entry, sort_keys=True)


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
        # Pre-warmed workers reserved for the live run that asked for them (worker -> run):
        # not spare capacity for other requests while they wait for their demand.
        self._prewarmed: dict[str, str] = {}
        # Requests already served, per running run: the same request added again (its trigger
        # re-run as a duplicate, or re-queued from a lost worker) starts nothing more.
        self._served: dict[str, set[bytes]] = {}

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
        # Queued demand first: a request due as a run starts (sent at submission) must not
        # take the workers its first invocations need as "starting".
        await self._scale()
        await self._prewarm()

    async def _next_wait_s(self) -> float:
        """Until the next reconcile: the tick, or sooner if a pre-warm request falls due."""
        head = await self.redis.zrange(self.keys.prewarm, 0, 0, withscores=True)
        if not head:
            return self.tick_s
        return min(self.tick_s, max(MIN_BLOCK_S, head[0][1] - time.time()))

    async def _prewarm(self) -> None:
        """Pre-scale ahead of the demand that due pre-warm requests anticipate (within the
        cap), counted in the requesting run's metrics; requests of runs that ended are dropped
        unstarted, at once (also those not due yet)."""
        entries = await self.redis.zrange(self.keys.prewarm, 0, -1, withscores=True)
        if not (entries or self._prewarmed or self._served):
            return
        runs = {json.loads(raw)["run"] for raw, _ in entries}
        runs |= set(self._prewarmed.values()) | set(self._served)
        live = await self._running(runs)
        self._release_prewarmed(live)
        self._served = {run: raws for run, raws in self._served.items() if run in live}
        now = time.time()
        due = [raw for raw, score in entries if score <= now or json.loads(raw)["run"] not in live]
        if not due:
            return
        await self.redis.zrem(self.keys.prewarm, *due)
        fresh = []
        for raw in due:
            run = json.loads(raw)["run"]
            if raw not in self._served.get(run, ()):
                fresh.append(json.loads(raw))
                if run in live:
                    self._served.setdefault(run, set()).add(raw)
        await self._start_prewarmed(fresh, live)

    async def _start_prewarmed(self, requests: list[dict[str, Any]], live: set[str]) -> None:
        """Create the workers of due requests (``live``: the runs still running). Demand is
        checked again first: none for a run that ended (cancelled, failed or done before the
        request fell due), and none where idle or starting workers of the class, beyond what
        is queued and not reserved by another pre-warm, will take the demand."""
        if not requests:
            return
        room = self.backend.max_workers - await self._active()
        spare = await self._spare()
        for request in requests:
            memory, count, run = int(request["mem"]), int(request["count"]), request["run"]
            wanted = count if run in live else 0
            covered = min(wanted, max(0, spare.get(memory, 0)))
            spare[memory] = spare.get(memory, 0) - covered
            started = 0
            for _ in range(min(wanted - covered, max(0, room))):
                handle = await self.backend.start_worker(memory, prewarm_for=run)
                self._prewarmed[handle.worker_id] = run
                self.workers_started += 1
                started += 1
            room -= started
            await self._scripts.add_to_run(
                AddToRunCall(
                    run_id=run, increments={"prewarm_requested": count, "prewarm_started": started}
                )
            )
            log.info(
                "pre-warm for run %s (trigger %s): %d of %d worker(s) of %d MiB started%s",
                run,
                request["trigger"],
                started,
                count,
                memory,
                "" if run in live else " (the run ended)",
            )

    async def _running(self, runs: set[str]) -> set[str]:
        """Those of ``runs`` still running (a cancelling run needs no more workers; a run
        whose meta is gone has ended)."""
        ordered = sorted(runs)
        if not ordered:
            return set()
        async with self.redis.pipeline(transaction=False) as pipe:
            for run in ordered:
                pipe.hget(RunKeys(run).meta, "status")
            statuses = await pipe.execute()
        running = RunStatus.RUNNING.encode()
        return {run for run, status in zip(ordered, statuses, strict=True) if status == running}

    async def idle_ids(self) -> dict[int, set[str]]:
        """The idle workers of each class, by id."""
        classes = sorted(int(c) for c in await self.redis.smembers(self.keys.classes))
        if not classes:
            return {}
        async with self.redis.pipeline(transaction=False) as pipe:
            for memory in classes:
                pipe.smembers(self.keys.idle(memory))
            found = await pipe.execute()
        return {m: {w.decode() for w in ids} for m, ids in zip(classes, found, strict=True)}

    def _release_prewarmed(self, live: set[str]) -> None:
        """Pre-warmed workers stop being reserved once they exited or their run ended."""
        alive = {h.worker_id for h in self.backend.alive()}
        for worker_id, run in list(self._prewarmed.items()):
            if worker_id not in alive or run not in live:
                del self._prewarmed[worker_id]

    async def _spare(self) -> dict[int, int]:
        """Per class: idle and starting workers beyond what is queued (negative: fewer), not
        counting pre-warmed ones still reserved for their run."""
        # Registrations first, as in _scale: a worker registering meanwhile counts as starting.
        registered = await self.redis.hkeys(self.keys.workers)
        idle = await self.idle_ids()
        async with self.redis.pipeline(transaction=False) as pipe:
            for memory in idle:
                pipe.llen(self.keys.queue(memory))
            queued = await pipe.execute()
        known = {w.decode() for w in registered} | set(self._prewarmed)
        starting: dict[int, int] = {}
        for handle in self.backend.alive():
            if handle.worker_id not in known:
                starting[handle.memory_mib] = starting.get(handle.memory_mib, 0) + 1
        return {
            memory: len(ids - set(self._prewarmed)) + starting.get(memory, 0) - waiting
            for (memory, ids), waiting in zip(idle.items(), queued, strict=True)
        }

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
        # Registrations before queues and idle sets: a worker that registers and takes an
        # invocation between the two reads is then counted twice (starting, and by the shorter
        # queue) rather than not at all, which would start a worker too many.
        alive = self.backend.alive()
        registered = {w.decode() for w in await self.redis.hkeys(self.keys.workers)}
        async with self.redis.pipeline(transaction=False) as pipe:
            for memory in classes:
                pipe.llen(self.keys.queue(memory))
                pipe.scard(self.keys.idle(memory))
            counts = await pipe.execute()
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
