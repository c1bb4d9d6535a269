"""The worker agent: takes invocations of its class and executes DAG branches, decentrally.

A worker registers as idle, takes an invocation (blocking move into its ``proc`` list, so a
lost worker's work can be re-queued), loads the run's DAG and plan (cached per run) and runs
tasks: gather inputs (local cache first, then Redis, re-running an upstream whose output was
lost), run the function in a thread (so heartbeats and I/O go on), and complete the task in
one Lua step that counts dependencies and queues or continues with ready downstream tasks.
An idle worker exits after ``idle_timeout_s``: the next start of its class is cold.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pickle
import signal
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NoReturn

import cloudpickle
from redis import exceptions as redis_exceptions

from dagkube.dag import DagSpec, TaskSpec, resolve
from dagkube.metrics.records import OomAttempt, TaskError, TaskRecord, WorkerRecord
from dagkube.planning.model import OptimizationIndex, Plan, output_must_be_stored
from dagkube.runtime import scripts
from dagkube.runtime.connection import MAX_BLOCK_S, BulkReader, ServerReplaced, ServerWatch
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.keys import PoolKeys, RunKeys, worker_heartbeat, worker_proc, worker_task
from dagkube.runtime.memory import PeakMeter
from dagkube.sources import format_exception, register_sources

log = logging.getLogger("dagkube.worker")

RUN_CACHE_SIZE = 4
TASK_TIMEOUT_EXIT = 124  # the exit code of a worker stopped by its task's timeout (as timeout(1))
EXIT_REDIS = 3  # its Redis restarted or stayed away past the grace (as the CLI's exit code)
RETRY_BACKOFF_S = 0.1  # first pause between attempts of a raising task; doubles each time
RETRY_BACKOFF_MAX_S = 10.0
STOP_DEADLINE_S = 15  # after SIGTERM a worker is gone within this, whatever its task does
DUP_POLL_S = 0.05  # a bound worker with taskdup candidates re-checks its upstreams this often
LATE_FACTOR = 1.5  # an upstream running this many times its predicted time is a straggler
LATE_GRACE_S = 0.05
DELAY_POLL_S = 0.005  # delayed-io: how often the other inputs of the fan-in are checked


@dataclass
class WorkerConfig:
    redis_url: str
    pool: str
    memory_mib: int
    worker_id: str
    cpu: float = 1.0
    idle_timeout_s: float = 30.0
    heartbeat_s: float = 1.0
    heartbeat_ttl_s: float = 10.0
    spawned_at: float | None = None
    prewarm_run: str | None = None  # created by this run's pre-warm request
    demand_run: str | None = None  # created for a queued invocation of this run


def serialize(value: Any) -> bytes:
    """Fast path with pickle; cloudpickle for lambdas, local classes and the like."""
    try:
        return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:  # not swallowed: what pickle refuses goes to cloudpickle, which raises too
        return cloudpickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


@dataclass
class RunState:
    """What a worker keeps of one run: DAG, plan, loaded code and the values it holds."""

    run_id: str
    dag: DagSpec
    plan: Plan
    ttl_s: int
    history_cap: int
    task_index: dict[str, int]
    submitted_at: float = 0.0
    opts: OptimizationIndex = field(default_factory=OptimizationIndex)
    values: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # serialized sizes of held values
    constants: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, Any] = field(default_factory=dict)
    loading: dict[str, asyncio.Future] = field(default_factory=dict)  # pre-loads in flight
    preloaded: dict[str, float] = field(default_factory=dict)  # input -> background seconds
    duplicated: dict[str, list[str]] = field(default_factory=dict)  # consumer -> re-run inputs
    _downstream_args: dict[str, list[str | int]] = field(default_factory=dict)
    _store: dict[str, bool] = field(default_factory=dict)
    _worker_tasks: dict[str, list[str]] | None = None

    def function(self, fn_key: str) -> Any:
        fn = self.functions.get(fn_key)
        if fn is None:
            fn = self.functions[fn_key] = pickle.loads(self.dag.functions[fn_key])
        return fn

    def downstream_args(self, task_id: str) -> list[str | int]:
        """The COMPLETE script's per-downstream arguments: id, deps, worker ("@" for a
        clustered child), class, pre-load host of this input."""
        args = self._downstream_args.get(task_id)
        if args is None:
            args = []
            clustered = task_id in self.opts.clustered
            for down in self.dag.tasks[task_id].downstream:
                down_plan = self.plan.tasks[down]
                args += [
                    down,
                    len(self.dag.tasks[down].deps),
                    "@" if clustered else (down_plan.worker_id or ""),
                    down_plan.memory_mib,
                    self.opts.preload_host.get((task_id, down), ""),
                ]
            self._downstream_args[task_id] = args
        return args

    def must_store(self, task_id: str) -> bool:
        """Upload an output only if a consumer may run elsewhere or it is a run output."""
        decided = self._store.get(task_id)
        if decided is None:
            decided = self._store[task_id] = output_must_be_stored(
                self.dag,
                task_id,
                lambda t: self.plan.tasks[t].worker_id,
                task_id in self.opts.clustered,
            )
        return decided

    def worker_tasks(self, logical_worker: str) -> list[str]:
        if self._worker_tasks is None:
            self._worker_tasks = self.plan.worker_tasks()
        return self._worker_tasks.get(logical_worker, [])


@dataclass
class Outcome:
    ok: bool
    record: TaskRecord
    output: bytes | None = None


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.pool = PoolKeys(config.pool)
        self.proc_key = worker_proc(config.worker_id, config.pool)
        self.runs: OrderedDict[str, RunState] = OrderedDict()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dagkube-task")
        # Pre-loaded inputs are deserialized here, never on the thread that runs tasks.
        self.preload_executor = ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="dagkube-preload"
        )
        # Every client of this worker rides out a short outage of its server and gives up on
        # one that restarted or stays away past the grace: the worker then exits (EXIT_REDIS).
        self.watch = ServerWatch(config.redis_url)
        self.redis: Any = None
        self.registered_at: float | None = None
        self.served_any = False
        self._waiting = False
        self.reader: Any = None
        self.beats: Any = None  # the heartbeat's own client
        self.stopping = False
        self._scripts: dict[str, Any] = {}
        self.task_key = worker_task(config.worker_id, config.pool)
        self.heartbeat_key = worker_heartbeat(config.worker_id, config.pool)
        self.meter = PeakMeter()
        self._escalations: dict[str, list[OomAttempt]] = {}  # task -> OOM-killed attempts
        # Serving an invocation re-queued from a lost worker: store every output it makes, so
        # that losing this worker too costs one task, not the lineage again.
        self._checkpoint = False
        self._peak_bytes: int | None = None  # of the tasks of the invocation being served

    # ----------------------------------------------------------------- lifecycle
    async def main(self, startup_delay_s: float = 0.0) -> None:
        """Serve until idle past the timeout, retired, or SIGTERM (scale-down, Pod deletion,
        cool-down, our parent exiting): then clean up — report being unused if this worker
        was created for a run it never served, and remove the registration and heartbeat, so
        nothing is left for the scaler to take for a lost worker."""
        asyncio.get_running_loop().add_signal_handler(
            signal.SIGTERM, self._terminate, asyncio.current_task()
        )
        heartbeat: asyncio.Task | None = None
        try:
            if startup_delay_s > 0:  # emulate a Pod's start-up: local cold starts cost as much
                await asyncio.sleep(startup_delay_s)
            self.redis = await self.watch.connect()
            self.beats = await self.watch.connect()
            self.reader = BulkReader(self.config.redis_url, watch=self.watch)
            for name in ("COMPLETE", "FAIL", "FINISH"):
                self._scripts[name] = self.redis.register_script(getattr(scripts, name))
            # A heartbeat first: the scaler takes a registered worker without one for lost.
            await self._beat()
            heartbeat = asyncio.create_task(self._heartbeat())
            await self.redis.hset(self.pool.workers, self.config.worker_id, self.config.memory_mib)
            self.registered_at = time.time()
            cold = True
            while not self.stopping:
                invocation = await self._take()
                status = ""
                while invocation is not None:
                    invocation, status = await self._serve(invocation, cold, status)
                    cold = False
        finally:
            if heartbeat is not None:
                heartbeat.cancel()
            try:
                if not self.watch.gone:  # a restarted server is told nothing more
                    await self._report_unused()
            except (redis_exceptions.RedisError, OSError) as exc:
                log.warning("worker %s: cannot report being unused: %s", self.config.worker_id, exc)
            if self.redis is not None and not self.watch.gone:
                try:
                    async with self.redis.pipeline(transaction=True) as pipe:
                        pipe.hdel(self.pool.workers, self.config.worker_id)
                        pipe.srem(self.pool.idle(self.config.memory_mib), self.config.worker_id)
                        pipe.srem(self.pool.waiting, self.config.worker_id)
                        pipe.delete(self.heartbeat_key, self.task_key)
                        pipe.lpush(self.pool.wake, "1")
                        pipe.ltrim(self.pool.wake, 0, 0)
                        await pipe.execute()
                except (redis_exceptions.RedisError, OSError) as exc:  # the scaler expires us
                    log.warning("worker %s: cannot deregister: %s", self.config.worker_id, exc)
            if self.redis is not None:
                await self.redis.aclose()
            if self.beats is not None:
                await self.beats.aclose()
            if self.reader is not None:
                self.reader.close()
            self.executor.shutdown(wait=False)
            self.preload_executor.shutdown(wait=False)

    def _terminate(self, main: asyncio.Task | None) -> None:
        self.stopping = True
        # SIGALRM's default action ends the process in the kernel: a task that never returns
        # cannot keep a stopped worker alive past the deadline (its clean-up has that long).
        signal.alarm(STOP_DEADLINE_S)
        if main is not None:
            main.cancel()

    async def _report_unused(self) -> None:
        """A worker created for a run (its pre-warm request, or a queued invocation that a
        worker already running took first) that never served anything: charge its life to
        that run, so unused workers are counted somewhere."""
        run = self.config.prewarm_run or self.config.demand_run
        if not run or self.served_any or self.config.spawned_at is None:
            return
        gb_s = (time.time() - self.config.spawned_at) * self.config.memory_mib / 1024
        kind = "prewarm_wasted" if self.config.prewarm_run else "workers_unused"
        # Stopped while starting up, it has no connection yet: open one to report.
        redis = self.redis if self.redis is not None else await self.watch.connect()
        try:
            add = redis.register_script(scripts.ADD_TO_RUN)
            await add(args=[run, kind, 1, f"{kind}_gb_s", gb_s])
        finally:
            if redis is not self.redis:
                await redis.aclose()
        log.info("run %s: worker created for it was not used (%s, %.2f GB-s)", run, kind, gb_s)

    async def _beat(self) -> None:
        ttl_ms = int(self.config.heartbeat_ttl_s * 1000)
        await self.beats.set(self.heartbeat_key, "1", px=ttl_ms)

    async def _heartbeat(self) -> None:
        """Beat every ``heartbeat_s`` on a connection of its own (opened at the start, so a
        beat never waits for a new connection while the main loop's is held by a blocking
        pop). A failed beat is logged and the next one tried: the task never ends quietly
        while the worker goes on working unseen."""
        while True:
            await asyncio.sleep(self.config.heartbeat_s)
            try:  # a beat that hangs is given up (its connection dropped) and tried again
                async with asyncio.timeout(self.config.heartbeat_ttl_s / 2):
                    await self._beat()
            except (redis_exceptions.RedisError, OSError, TimeoutError) as exc:
                log.warning("worker %s: heartbeat failed: %r", self.config.worker_id, exc)

    async def _take(self) -> Invocation | None:
        """Wait idle for an invocation of this class; None after the idle timeout."""
        idle = self.pool.idle(self.config.memory_mib)
        await self.redis.sadd(idle, self.config.worker_id)
        idle_until = time.monotonic() + self.config.idle_timeout_s
        try:
            raw = None
            # In slices of at most MAX_BLOCK_S: a stopped Redis is noticed by the read timeout.
            while raw is None and (left := idle_until - time.monotonic()) > 0:
                raw = await self.redis.blmove(
                    self.pool.queue(self.config.memory_mib),
                    self.proc_key,
                    min(left, MAX_BLOCK_S),
                    "LEFT",
                    "RIGHT",
                )
        finally:
            await self.redis.srem(idle, self.config.worker_id)
        if raw is None:
            log.info(
                "worker %s: idle for %.1fs, exiting",
                self.config.worker_id,
                self.config.idle_timeout_s,
            )
            self.stopping = True
            return None
        invocation = Invocation.from_json(raw)
        if invocation.retire:
            await self.redis.delete(self.proc_key)
            self.stopping = True
            return None
        return invocation

    # ----------------------------------------------------------------- runs
    async def _load_run(self, run_id: str) -> RunState | None:
        state = self.runs.get(run_id)
        if state is not None:
            self.runs.move_to_end(run_id)
            return state
        keys = RunKeys(run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.dag)
            pipe.get(keys.plan)
            pipe.hmget(keys.meta, "ttl_s", "history_cap", "submitted_at")
            dag_blob, plan_json, (ttl_s, cap, submitted) = await pipe.execute()
        if dag_blob is None or plan_json is None:
            log.warning("run %s: DAG or plan missing (expired?), dropping its invocation", run_id)
            return None
        loop = asyncio.get_running_loop()
        dag, plan = await loop.run_in_executor(
            self.executor,
            lambda: (DagSpec.from_bytes(dag_blob), Plan.model_validate_json(plan_json)),
        )
        register_sources(dag.source_lines)  # remote tracebacks show the user's lines
        state = RunState(
            run_id=run_id,
            dag=dag,
            plan=plan,
            ttl_s=int(ttl_s or 3600),
            history_cap=int(cap or 100),
            task_index={task_id: i for i, task_id in enumerate(dag.tasks)},
            submitted_at=float(submitted or time.time()),
            opts=OptimizationIndex.of({t: p.optimizations for t, p in plan.tasks.items()}),
        )
        self.runs[run_id] = state
        while len(self.runs) > RUN_CACHE_SIZE:
            self.runs.popitem(last=False)
        return state

    async def _serve(
        self, invocation: Invocation, cold: bool, status: str
    ) -> tuple[Invocation | None, str]:
        """Run one invocation to its end, then finish it; returns the next queued invocation
        of this class (taken in the same step, so it is served warm without an idle wait)."""
        ready_at = time.time()
        spawned = self.config.spawned_at
        # A first invocation is a cold start only if the worker was spawned for this demand;
        # one that sat idle since an earlier spawn was ready before the invocation was queued.
        if cold and spawned is not None and invocation.queued_at and spawned < invocation.queued_at:
            cold = False
        prewarmed = not self.served_any and self.config.prewarm_run == invocation.run
        self.served_any = True
        cpu_before = 0.0 if cold else _process_cpu_s()
        self._escalations = {}
        self._checkpoint = invocation.resume
        for attempt in invocation.escalations:
            self._escalations.setdefault(str(attempt.get("task") or ""), []).append(
                OomAttempt(memory_mib=int(attempt["mem"]), peak_memory_bytes=attempt.get("peak"))
            )
        self._peak_bytes = None
        state = await self._load_run(invocation.run)
        served = 0
        first_task_at: float | None = None
        amendments: list[str] = []
        if state is not None and status in ("", "running"):
            if invocation.worker is None:
                served, first_task_at = await self._serve_flexible(state, invocation, amendments)
            else:
                served, first_task_at = await self._serve_bound(state, invocation, amendments)
        finished_at = time.time()
        # A pre-warmed worker's wait for this run's demand is the run's cost too.
        held_from = (spawned or ready_at) if cold or prewarmed else ready_at
        record = WorkerRecord(
            run_id=invocation.run,
            worker_id=self.config.worker_id,
            logical_worker=invocation.worker,
            memory_mib=self.config.memory_mib,
            cpu=self.config.cpu,
            cold=cold,
            queued_at=invocation.queued_at or None,
            spawned_at=self.config.spawned_at if cold or prewarmed else None,
            ready_at=ready_at,
            first_task_at=first_task_at,
            finished_at=finished_at,
            tasks_served=served,
            startup_s=(first_task_at - invocation.queued_at)
            if first_task_at and invocation.queued_at
            else None,
            cpu_s_used=_process_cpu_s() - cpu_before,
            resumed=invocation.resume,
            prewarmed=prewarmed,
            registered_at=self.registered_at,
            peak_memory_bytes=self._peak_bytes,
        )
        held_s = max(0.0, finished_at - held_from)
        next_queue = "" if self.stopping else self.pool.queue(self.config.memory_mib)
        ttl_s = state.ttl_s if state else 3600
        cap = state.history_cap if state else 100
        _finalized, _status, nxt, nxt_status = await self._scripts["FINISH"](
            args=[
                invocation.run,
                self.pool.prefix,
                self.proc_key,
                f"{self.config.worker_id}:{ready_at:.6f}",
                record.model_dump_json(),
                held_s * self.config.memory_mib / 1024,
                held_s * self.config.cpu,
                record.cpu_s_used,
                1 if cold else 0,
                finished_at,
                ttl_s,
                cap,
                next_queue,
                1 if prewarmed else 0,
                len(amendments) // 2,
                *amendments,
            ]
        )
        if not nxt:
            return None, ""
        invocation = Invocation.from_json(nxt)
        if invocation.retire:
            await self.redis.delete(self.proc_key)
            self.stopping = True
            return None, ""
        return invocation, nxt_status.decode()

    async def _serve_flexible(
        self, state: RunState, invocation: Invocation, amendments: list[str]
    ) -> tuple[int, float | None]:
        """Run the roots, each with its continuation and clustered children, depth first. The
        roots still to run travel with every COMPLETE, which keeps them in the proc list."""
        served = 0
        first: float | None = None
        pending: deque[str] = deque(invocation.roots)
        preloaders: list[Preloader] = []
        done = RunKeys(state.run_id).done
        try:
            while pending:
                current = pending.popleft()
                if invocation.resume and await self.redis.sismember(done, current):
                    continue  # re-queued from a lost worker that had completed it
                if "@" + current in state.opts.hosts:
                    preloaders.append(Preloader(self, state, "@" + current))
                reply, started_at = await self._step(
                    state, current, None, amendments, pending=list(pending)
                )
                first = first or started_at
                served += 1
                if reply is None:
                    break
                pending.extendleft(reversed([r.decode() for r in reply[3:]]))
                if reply[1]:
                    pending.appendleft(reply[1].decode())
        finally:
            for preloader in preloaders:
                await preloader.stop()
        return served, first

    async def _serve_bound(
        self, state: RunState, invocation: Invocation, amendments: list[str]
    ) -> tuple[int, float | None]:
        me = invocation.worker
        assert me is not None
        keys = RunKeys(state.run_id)
        assigned = state.worker_tasks(me)
        done = (
            {m.decode() for m in await self.redis.smembers(keys.done)}
            if invocation.resume
            else set()
        )
        remaining = {t for t in assigned if t not in done}
        ready: deque[str] = deque(invocation.roots)
        if invocation.resume:
            ready.extend(
                t
                for t in assigned
                if t in remaining and all(d in done for d in state.dag.tasks[t].deps)
            )
        preloader = Preloader(self, state, me) if me in state.opts.hosts else None
        may_duplicate = bool(remaining.intersection(state.opts.dups))
        served = 0
        first: float | None = None
        blocked_since: float | None = None
        try:
            while remaining:
                if not ready:
                    blocked_since = blocked_since or time.time()
                    timeout = DUP_POLL_S if may_duplicate else MAX_BLOCK_S
                    item = await self._wait_inbox(keys.inbox(me), timeout)
                    if item is None:
                        if may_duplicate:
                            served += await self._duplicate_late_upstream(
                                state, me, remaining, ready, amendments
                            )
                        status = await self.redis.hget(keys.meta, "status")
                        if status != b"running":
                            break
                        continue
                    task_id = item[1].decode()
                    if not task_id:  # stop token: the run failed or was cancelled
                        break
                    ready.append(task_id)
                    continue
                current = ready.popleft()
                if current not in remaining:
                    continue
                await self._stop_waiting()
                if current in state.opts.dup_targets and await self._duplicated_elsewhere(
                    state, current
                ):
                    remaining.discard(current)  # a consumer's duplicate already completed it
                    continue
                blocked = time.time() - blocked_since if blocked_since else 0.0
                blocked_since = None
                reply, started_at = await self._step(
                    state, current, me, amendments, blocked_s=blocked
                )
                first = first or started_at
                served += 1
                remaining.discard(current)
                if reply is None:
                    break
                ready.extend(r.decode() for r in reply[3:])
        finally:
            await self._stop_waiting()
            if preloader is not None:
                await preloader.stop()
        return served, first

    async def _wait_inbox(self, inbox: str, timeout: float) -> Any:
        """Block on a bound worker's inbox. While blocked it uses no CPU, so it is listed as
        waiting: the scaler does not count it against the worker cap (else bound workers
        waiting for each other's inputs could hold every slot). It stays listed across
        timeouts until it takes a task (:meth:`_stop_waiting`)."""
        item = await self.redis.lpop(inbox)
        if item is not None:
            return (inbox, item)
        if not self._waiting:
            self._waiting = True
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(self.pool.waiting, self.config.worker_id)
                pipe.lpush(self.pool.wake, "1")
                pipe.ltrim(self.pool.wake, 0, 0)
                await pipe.execute()
        return await self.redis.blpop(inbox, timeout=timeout)

    async def _stop_waiting(self) -> None:
        if self._waiting:
            self._waiting = False
            await self.redis.srem(self.pool.waiting, self.config.worker_id)

    # ----------------------------------------------------------------- taskdup
    async def _duplicated_elsewhere(self, state: RunState, task_id: str) -> bool:
        """Before a task a consumer may duplicate: note its start (the consumer's lateness
        test) and skip it if a duplicate already completed it."""
        keys = RunKeys(state.run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(keys.started, task_id, time.time())
            pipe.sismember(keys.done, task_id)
            _, done = await pipe.execute()
        return bool(done)

    async def _duplicate_late_upstream(
        self,
        state: RunState,
        me: str,
        remaining: set[str],
        ready: deque[str],
        amendments: list[str],
    ) -> int:
        """taskdup: with nothing to run, re-run an upstream of a waiting task here when it is
        late (a straggler: running ``LATE_FACTOR`` times its prediction, or not started past
        its predicted end) or when the prediction says a local re-run ends sooner. One claim
        per task makes sure only one duplicate runs. Returns the tasks executed (0 or 1)."""
        candidates = [(t, p) for t in sorted(remaining) for p in state.opts.dups.get(t, ())]
        upstreams = sorted({p["upstream"] for _, p in candidates})
        if not upstreams:  # the waiting tasks left have no upstream to duplicate
            return 0
        keys = RunKeys(state.run_id)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(keys.done, upstreams)
            pipe.hmget(keys.started, upstreams)
            done_flags, starts = await pipe.execute()
        done = {u for u, flag in zip(upstreams, done_flags, strict=True) if flag}
        started = {u: float(v) for u, v in zip(upstreams, starts, strict=True) if v is not None}
        now = time.time() - state.submitted_at
        for consumer, params in candidates:
            upstream = params["upstream"]
            if upstream in done or not _late(params, started.get(upstream), state, now):
                continue
            claim = keys.duplicate(upstream)
            if not await self.redis.set(claim, self.config.worker_id, nx=True, ex=state.ttl_s):
                continue
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.sadd(keys.keyset, claim)
                pipe.hincrby(keys.meta, "tasks_duplicated", 1)
                await pipe.execute()
            log.info("run %s: %s is late; running a duplicate for %s", state.run_id, upstream, me)
            await self._stop_waiting()
            state.duplicated.setdefault(consumer, []).append(upstream)
            reply, _ = await self._step(state, upstream, me, amendments, duplicate=True)
            if reply is not None:
                ready.extend(r.decode() for r in reply[3:])
            return 1
        return 0

    # ----------------------------------------------------------------- tasks
    async def _step(
        self,
        state: RunState,
        task_id: str,
        me: str | None,
        amendments: list[str],
        *,
        pending: list[str] | None = None,
        blocked_s: float = 0.0,
        duplicate: bool = False,
    ) -> tuple[list[bytes] | None, float]:
        """Execute one task, then fail the run or complete the task. Returns the COMPLETE
        reply, or None when this invocation must stop (the task failed or the run ended),
        and the task's start time."""
        outcome = await self._execute(state, task_id, me, blocked_s, duplicate)
        if not outcome.ok:
            await self._fail(state, outcome)
            return None, outcome.record.started_at
        keep_for = None
        if me is None and task_id in state.opts.delayed:
            keep_for = await self._delay_upload(state, outcome)
        reply = await self._complete(state, outcome, me, amendments, pending or [])
        if keep_for is not None and reply[0] == b"running" and reply[1].decode() != keep_for:
            # Not this worker's fan-in after all (cannot happen unless a duplicate raced):
            # store the output so whoever runs it can read it.
            await self.redis.hset(RunKeys(state.run_id).outputs, task_id, outcome.output)
        return (reply if reply[0] == b"running" else None), outcome.record.started_at

    async def _delay_upload(self, state: RunState, outcome: Outcome) -> str | None:
        """delayed-io: wait (up to the planned time) for the fan-in's other inputs; when they
        are all done, this worker runs the fan-in next, so the output need not be uploaded.
        Returns the fan-in when the upload is skipped."""
        record = outcome.record
        fan_in, wait_s = state.opts.delayed[record.task_id]
        others = [d for d in state.dag.tasks[fan_in].deps if d != record.task_id]
        done_key = RunKeys(state.run_id).done
        deadline = time.monotonic() + wait_s
        while True:
            if all(await self.redis.smismember(done_key, others)):
                record.delayed_io = "kept"
                record.output_stored = False
                return fan_in
            if time.monotonic() >= deadline:
                record.delayed_io = "uploaded"
                return None
            await asyncio.sleep(DELAY_POLL_S)

    async def _gather(
        self, state: RunState, spec: TaskSpec
    ) -> tuple[dict[str, bytes], list[str], float, int]:
        """Fetch inputs not held locally; returns raw bytes by task, re-run lost upstreams."""
        keys = RunKeys(state.run_id)
        loading = {state.loading[d] for d in spec.deps if d in state.loading}
        if loading:  # pre-loads of these inputs are in flight: they finish sooner than a fetch
            await asyncio.gather(*loading)
        missing = [d for d in spec.deps if d not in state.values]
        wanted_consts = [k for k in spec.const_keys if k not in state.constants]
        raw: dict[str, bytes] = {}
        download_s = 0.0
        nbytes = 0
        if missing or wanted_consts:
            started = time.perf_counter()
            requests = []
            if missing:
                requests.append((keys.outputs, missing))
            if wanted_consts:
                requests.append((keys.constants, wanted_consts))
            replies = await self.reader.hmget_many(requests)
            download_s = time.perf_counter() - started
            if missing:
                for dep, blob in zip(missing, replies[0], strict=True):
                    if blob is not None:
                        raw[dep] = blob
                        nbytes += len(blob)
            if wanted_consts:
                consts = replies[-1]
                for key, blob in zip(wanted_consts, consts, strict=True):
                    if blob is None:
                        raise RuntimeError(f"run {state.run_id}: constant {key} is missing")
                    raw["const:" + key] = blob
                    nbytes += len(blob)
        lost = [d for d in missing if d not in raw]
        recomputed = await self._recompute(state, lost) if lost else []
        return raw, recomputed, download_s, nbytes

    async def _recompute(self, state: RunState, lost: list[str]) -> list[str]:
        """Re-run upstream tasks whose outputs are gone (their worker died before a consumer
        elsewhere needed them). Walks lineage breadth-first, then runs in topological order."""
        keys = RunKeys(state.run_id)
        needed: set[str] = set()
        frontier = list(lost)
        fetched: dict[str, bytes] = {}
        while frontier:
            needed.update(frontier)
            parents = sorted(
                {d for t in frontier for d in state.dag.tasks[t].deps}
                - needed
                - set(state.values)
                - set(fetched)
            )
            frontier = []
            if parents:
                (blobs,) = await self.reader.hmget_many([(keys.outputs, parents)])
                for parent, blob in zip(parents, blobs, strict=True):
                    if blob is None:
                        frontier.append(parent)
                    else:
                        fetched[parent] = blob
        order = sorted(needed, key=state.task_index.__getitem__)
        log.warning(
            "run %s: re-running %d task(s) whose outputs were lost: %s",
            state.run_id,
            len(order),
            ", ".join(order[:5]),
        )
        loop = asyncio.get_running_loop()
        outputs: dict[str, bytes] = {}

        def rerun() -> None:
            for dep, blob in fetched.items():
                state.values[dep] = pickle.loads(blob)
            for task_id in order:
                spec = state.dag.tasks[task_id]
                args, kwargs = resolve(pickle.loads(spec.args_blob), state.values, state.constants)
                state.values[task_id] = state.function(spec.fn_key)(*args, **kwargs)
                outputs[task_id] = serialize(state.values[task_id])
                state.sizes[task_id] = len(outputs[task_id])

        await loop.run_in_executor(self.executor, rerun)
        # Stored now: should this worker be lost too, the next one does not re-run them again.
        await self.redis.hset(keys.outputs, mapping=outputs)
        return order

    async def _execute(
        self,
        state: RunState,
        task_id: str,
        me: str | None,
        blocked_s: float = 0.0,
        duplicate: bool = False,
    ) -> Outcome:
        spec = state.dag.tasks[task_id]
        ready_at = time.time()
        prewarms = state.opts.prewarm.get(task_id, ())
        prewarm_at = await self._request_prewarm(state, task_id, prewarms) if prewarms else None
        # What the worker runs now: a worker killed for memory is charged to this task (the
        # REQUEUE script reads it; COMPLETE clears it).
        claim = {"run": state.run_id, "task": task_id, "function": spec.function}
        await self.redis.set(self.task_key, json.dumps(claim), ex=state.ttl_s)
        raw, recomputed, download_s, download_bytes = await self._gather(state, spec)
        preloaded = [d for d in spec.deps if d in state.preloaded]
        store = state.must_store(task_id) or self._checkpoint
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(
            self.executor, _run_in_thread, state, spec, raw, store, self.meter
        )
        if spec.timeout_s is None:
            done = await running
        else:
            done = await self._within_timeout(state, spec, running, claim)
        if done.peak_bytes is not None:
            self._peak_bytes = max(self._peak_bytes or 0, done.peak_bytes)
        record = TaskRecord(
            run_id=state.run_id,
            task_id=task_id,
            function=spec.function,
            worker_id=self.config.worker_id,
            logical_worker=me,
            memory_mib=self.config.memory_mib,
            ready_at=ready_at,
            inputs_ready_at=done.inputs_ready_at,
            started_at=done.started_at,
            ended_at=done.ended_at,
            input_bytes=done.input_bytes,
            input_wait_s=done.inputs_ready_at - ready_at,
            download_s=download_s,
            download_bytes=download_bytes,
            output_bytes=done.output_bytes,
            output_stored=store and done.error is None,
            cpu_s=done.cpu_s,
            retries=done.attempts - 1,
            recomputed=recomputed,
            error=done.error,
            blocked_s=blocked_s,
            preloaded=preloaded,
            preload_s=sum(state.preloaded[d] for d in preloaded),
            duplicate=duplicate,
            duplicated=state.duplicated.get(task_id, []),
            prewarm_at=prewarm_at,
            prewarm_targets=[t for p in prewarms for t in p.get("targets", [])],
            peak_memory_bytes=done.peak_bytes,
            oom_attempts=[] if duplicate else self._escalations.get(task_id, []),
        )
        return Outcome(ok=done.error is None, record=record, output=done.output)

    async def _within_timeout(
        self, state: RunState, spec: TaskSpec, running: asyncio.Future, claim: dict[str, Any]
    ) -> _Execution:
        """The execution, or past the task's timeout the end of this worker: a thread cannot
        be stopped, so the process exits (TASK_TIMEOUT_EXIT) and the scaler's REQUEUE reads
        the deadline below to re-run the task on a fresh worker or fail it with TaskTimeout.
        Should this process not get to exit (its loop starved), the scaler stops it."""
        assert spec.timeout_s is not None
        deadline = time.time() + spec.timeout_s
        claim = {
            **claim,
            "deadline": deadline,
            "timeout_s": spec.timeout_s,
            "retries": spec.retries,
        }
        await self.redis.set(self.task_key, json.dumps(claim), ex=state.ttl_s)
        try:
            return await asyncio.wait_for(asyncio.shield(running), spec.timeout_s)
        except TimeoutError:
            log.error(
                "run %s task %s: still running after its timeout of %gs: stopping this worker",
                state.run_id,
                spec.id,
                spec.timeout_s,
            )
            logging.shutdown()
            sys.stdout.flush()
            os._exit(TASK_TIMEOUT_EXIT)

    async def _request_prewarm(
        self, state: RunState, task_id: str, requests: Iterable[dict[str, Any]]
    ) -> float:
        """prewarm: ask the scaler for workers of a class, due ``delay_s`` after this start
        (a sorted set scored by due time; the scaler creates them when due)."""
        now = time.time()
        due = now
        async with self.redis.pipeline(transaction=False) as pipe:
            for params in requests:
                due = now + float(params["delay_s"])
                request = {
                    "run": state.run_id,
                    "mem": int(params["memory_mib"]),
                    "count": int(params["count"]),
                    "trigger": task_id,
                }
                pipe.zadd(self.pool.prewarm, {json.dumps(request, sort_keys=True): due})
            pipe.lpush(self.pool.wake, "1")
            pipe.ltrim(self.pool.wake, 0, 0)
            await pipe.execute()
        return due

    async def _complete(
        self,
        state: RunState,
        outcome: Outcome,
        me: str | None,
        amendments: list[str],
        pending: list[str],
    ) -> list[bytes]:
        record = outcome.record
        store = outcome.output is not None and record.output_stored
        field_name = record.task_id + ("@dup" if record.duplicate else "")
        started = time.perf_counter()
        reply = await self._scripts["COMPLETE"](
            args=[
                state.run_id,
                self.pool.prefix,
                record.task_id,
                "1" if store else "0",
                outcome.output if store else b"",
                record.model_dump_json(),
                field_name,
                self.proc_key,
                me or "",
                self.config.memory_mib,
                record.ended_at,
                len(amendments) // 2,
                *amendments,
                len(pending),
                *pending,
                *state.downstream_args(record.task_id),
            ]
        )
        amendments.clear()
        if store:
            # The upload rode on this call: amend the record in the next call with its time.
            record.upload_s = time.perf_counter() - started
            amendments += [field_name, record.model_dump_json()]
        return reply

    async def _fail(self, state: RunState, outcome: Outcome) -> None:
        record = outcome.record
        assert record.error is not None
        error = {
            "task_id": record.task_id,
            "function": record.function,
            "exc_type": record.error.exc_type,
            "message": record.error.message,
            "traceback": record.error.traceback,
            "worker_id": self.config.worker_id,
        }
        await self._scripts["FAIL"](
            args=[state.run_id, record.task_id, record.model_dump_json(), json.dumps(error)]
        )
        log.error(
            "run %s: task %s failed: %s: %s",
            state.run_id,
            record.task_id,
            record.error.exc_type,
            record.error.message,
        )


class Preloader:
    """preload: fetches a host's fan-in inputs as their producers store them (the COMPLETE
    script lists them for the host), downloading on the I/O thread and deserializing on the
    preload thread, so the task thread keeps running. A task that needs an input still in
    flight awaits it instead of fetching it again."""

    def __init__(self, worker: Worker, state: RunState, host: str) -> None:
        self.worker = worker
        self.state = state
        self.key = RunKeys(state.run_id).preload(host)
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        redis = self.worker.redis
        while True:
            first = await redis.blpop(self.key, timeout=1.0)
            if first is None:
                continue
            ids = [first[1].decode()]
            more = await redis.lpop(self.key, 100)
            ids += [m.decode() for m in more or ()]
            try:
                await self._load(ids)
            except (redis_exceptions.RedisError, pickle.UnpicklingError, OSError) as exc:
                # The task fetches the input itself, as without pre-loading.
                log.warning("run %s: pre-load of %s failed: %s", self.state.run_id, ids, exc)

    async def _load(self, ids: list[str]) -> None:
        state = self.state
        ids = [i for i in dict.fromkeys(ids) if i not in state.values and i not in state.loading]
        if not ids:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        for input_id in ids:
            state.loading[input_id] = future
        started = time.perf_counter()
        try:
            (blobs,) = await self.worker.reader.hmget_many([(RunKeys(state.run_id).outputs, ids)])

            def deserialize() -> None:
                for input_id, blob in zip(ids, blobs, strict=True):
                    if blob is not None:
                        state.values[input_id] = pickle.loads(blob)
                        state.sizes[input_id] = len(blob)

            await loop.run_in_executor(self.worker.preload_executor, deserialize)
            share = (time.perf_counter() - started) / len(ids)
            for input_id in ids:
                if input_id in state.values:
                    state.preloaded[input_id] = share
        finally:
            for input_id in ids:
                state.loading.pop(input_id, None)
            future.set_result(None)


def _late(params: dict[str, Any], started_at: float | None, state: RunState, now: float) -> bool:
    """taskdup's test, on times relative to the run's submission: is the upstream a
    straggler, or does the prediction say a re-run here ends before the original?"""
    original_exec = float(params["original_exec_s"])
    original_end = float(params["original_end_s"])
    here = now + float(params["exec_s"])
    if started_at is not None:
        started = started_at - state.submitted_at
        if now - started > LATE_FACTOR * original_exec + LATE_GRACE_S:
            return True
        return here < started + original_exec - LATE_GRACE_S
    if now > original_end + LATE_GRACE_S:
        return True  # not even started when it was predicted to have ended
    return here < max(original_end, now + original_exec) - LATE_GRACE_S


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


@dataclass
class _Execution:
    """What the task thread hands back to the event loop."""

    output: bytes | None  # serialized output, when it must be uploaded
    output_bytes: int
    input_bytes: int
    inputs_ready_at: float
    started_at: float
    ended_at: float
    cpu_s: float
    attempts: int
    error: TaskError | None
    peak_bytes: int | None = None


def _task_error(exc: BaseException, context: str = "") -> TaskError:
    """A task's exception as it is recorded (TaskError caps its message and traceback)."""
    return TaskError(
        exc_type=type(exc).__qualname__,
        message=context + str(exc),
        traceback=format_exception(exc),
    )


def retry_delay_s(attempt: int) -> float:
    """The pause before retry number ``attempt`` of a raising task: exponential, capped (a
    failing dependency gets time to recover; a retried task does not hammer it)."""
    return float(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), RETRY_BACKOFF_MAX_S))


def _run_in_thread(
    state: RunState, spec: TaskSpec, raw: dict[str, bytes], store: bool, meter: PeakMeter
) -> _Execution:
    """Deserialize inputs, run the function (with retries), serialize the output; the
    worker's peak memory over all of it (inputs held, output serialized) is the task's.

    Runs on the task thread so the event loop keeps heartbeating and downloading. The output
    is always serialized, so its size is known (the planner's input-size feature), and
    returned for upload only when ``store``.
    """
    meter.reset()
    for key, blob in raw.items():
        if key.startswith("const:"):
            state.constants[key[6:]] = pickle.loads(blob)
            state.sizes[key] = len(blob)
        else:
            state.values[key] = pickle.loads(blob)
            state.sizes[key] = len(blob)
    input_bytes = (
        len(spec.args_blob)
        + sum(state.sizes.get(d, 0) for d in spec.deps)
        + sum(state.sizes.get("const:" + k, 0) for k in spec.const_keys)
    )
    inputs_ready_at = time.time()
    attempts = 0
    error: TaskError | None = None
    value: Any = None
    cpu_start = time.thread_time()
    started_at = time.time()
    while True:
        attempts += 1
        try:
            args, kwargs = resolve(pickle.loads(spec.args_blob), state.values, state.constants)
            value = state.function(spec.fn_key)(*args, **kwargs)
            error = None
            break
        # What the user's function raised is data here, reported like any task error:
        # BaseException too (sys.exit(), KeyboardInterrupt raised by the code, a library's
        # own control-flow exception). None of the worker's own stops can arrive here: this
        # is the task thread, while signals and cancellation reach the event loop's thread.
        except BaseException as exc:
            error = _task_error(exc)
            if attempts > spec.retries:
                break
            time.sleep(retry_delay_s(attempts))
    ended_at = time.time()
    cpu_s = time.thread_time() - cpu_start
    serialized: bytes | None = None
    if error is None:
        state.values[spec.id] = value
        try:
            serialized = serialize(value)
            state.sizes[spec.id] = len(serialized)
        except BaseException as exc:  # the output's own pickling code raised (user code too)
            error = _task_error(exc, f"the output of {spec.id} cannot be serialized: ")
    return _Execution(
        peak_bytes=meter.peak_bytes(),
        output=serialized if store else None,
        output_bytes=len(serialized) if serialized is not None else 0,
        input_bytes=input_bytes,
        inputs_ready_at=inputs_ready_at,
        started_at=started_at,
        ended_at=ended_at,
        cpu_s=cpu_s,
        attempts=attempts,
        error=error,
    )


def _die_with_parent(parent_pid: int) -> None:
    """Linux: get SIGTERM when the process that spawned us dies (no orphan workers)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() != parent_pid:
        os._exit(0)


def parse_args(argv: Iterable[str] | None = None) -> WorkerConfig:
    parser = argparse.ArgumentParser(
        prog="python -m dagkube.worker",
        description="dagkube worker agent: serves invocations of one resource class. The Redis "
        "URL comes from DAGKUBE_REDIS_URL (never from the command line: it may hold a password).",
    )
    parser.add_argument("--pool", required=True, help="worker pool (scaler) this worker serves")
    parser.add_argument("--memory-mib", type=int, required=True, help="resource class in MiB")
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--cpu", type=float, default=1.0, help="vCPUs allocated (for accounting)")
    parser.add_argument("--idle-timeout", type=float, default=30.0, help="seconds idle before exit")
    parser.add_argument("--heartbeat", type=float, default=1.0, help="seconds between heartbeats")
    args = parser.parse_args(list(argv) if argv is not None else None)
    url = os.environ.get("DAGKUBE_REDIS_URL")
    if not url:
        parser.error("DAGKUBE_REDIS_URL is not set")
    spawned = os.environ.get("DAGKUBE_SPAWNED_AT")
    prewarm_run = os.environ.get("DAGKUBE_PREWARM_RUN") or None
    demand_run = os.environ.get("DAGKUBE_DEMAND_RUN") or None
    return WorkerConfig(
        redis_url=url,
        pool=args.pool,
        memory_mib=args.memory_mib,
        worker_id=args.worker_id,
        cpu=args.cpu,
        idle_timeout_s=args.idle_timeout,
        heartbeat_s=args.heartbeat,
        heartbeat_ttl_s=max(5.0, args.heartbeat * 5),
        spawned_at=float(spawned) if spawned else None,
        prewarm_run=prewarm_run,
        demand_run=demand_run,
    )


def main(argv: Iterable[str] | None = None) -> NoReturn:
    config = parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DAGKUBE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s worker {config.worker_id}: %(message)s",
    )
    parent = os.environ.get("DAGKUBE_PARENT_PID")
    if parent:
        _die_with_parent(int(parent))
    worker = Worker(config)

    def stop(*_: object) -> None:  # until Worker.main installs its own: nothing to clean up
        worker.stopping = True
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    delay_s = float(os.environ.get("DAGKUBE_STARTUP_DELAY_S") or 0)
    try:
        asyncio.run(worker.main(startup_delay_s=delay_s))
        code = 0
    except KeyboardInterrupt:
        code = 130
    except asyncio.CancelledError:  # SIGTERM once running: cleaned up, a normal stop
        code = 0
    except (ServerReplaced, redis_exceptions.ConnectionError, redis_exceptions.TimeoutError):
        if not worker.watch.gone:
            raise
        # Restarted (what this worker knows may be ahead of what it kept) or away past the
        # grace: exit, one line; whoever owns the run decides its fate.
        log.error("%s: exiting", worker.watch.describe())
        code = EXIT_REDIS
    # Exit now: a normal interpreter exit would wait for the task thread, which may be in a
    # task that never returns (the worker has cleaned up; only that thread is left).
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
