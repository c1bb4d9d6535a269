"""The worker agent: takes invocations of its class and executes DAG branches, decentrally.

A worker registers as idle, takes an invocation (blocking move into its ``proc`` list, so a
lost worker's work can be re-queued), loads the run's DAG and plan (cached per run) and serves
it: what runs next and every optimization's decision come from the worker's core, a state
machine without I/O (``dagkube.runtime.workercore``); ``serving`` carries out its
instructions (gather inputs, run the function in a thread so heartbeats and I/O go on,
complete the task in one Lua step that counts dependencies and routes ready downstream
tasks). This module is the process around it: connection, registration, heartbeat, taking
and finishing invocations (charged as :func:`dagkube.planning.rules.start_charge` says),
stopping. An idle worker exits after ``idle_timeout_s``: the next start of its class is cold.
A pre-warmed worker that has served nothing exits as soon as its run no longer needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import json
import logging
import os
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

from redis import exceptions as redis_exceptions

from dagkube.dag import DagSpec, TaskSpec
from dagkube.planning.model import OptimizationIndex, Plan
from dagkube.planning.rules import start_charge
from dagkube.runtime.execution import Execution
from dagkube.runtime.inputs import RunState
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.memory import PeakMeter
from dagkube.runtime.serving import Serving
from dagkube.runtime.workercore.messages import Finish
from dagkube.sources import register_sources
from dagkube.store.calls import AddToRunCall, FinishCall
from dagkube.store.connection import (
    MAX_BLOCK_S,
    BulkReader,
    ServerReplaced,
    ServerWatch,
    block_timeout,
)
from dagkube.store.keys import PoolKeys, RunKeys, worker_heartbeat, worker_proc, worker_task
from dagkube.store.objects import store_from_env
from dagkube.store.records import RunStatus, WorkerRecord
from dagkube.store.scripts import Scripts

log = logging.getLogger("dagkube.worker")

RUN_CACHE_SIZE = 4
TASK_TIMEOUT_EXIT = 124  # the exit code of a worker stopped by its task's timeout (as timeout(1))
EXIT_REDIS = 3  # its Redis restarted or stayed away past the grace (as the CLI's exit code)
STOP_DEADLINE_S = 15  # after SIGTERM a worker is gone within this, whatever its task does
PREWARM_CHECK_S = 0.25  # an unused pre-warmed worker asks this often whether it is still needed


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
        self.reader: Any = None
        self.beats: Any = None  # the heartbeat's own client
        self.stopping = False
        self.stopped_at: float | None = None  # when SIGTERM came (charged until then if unused)
        self.scripts: Scripts  # on self.redis, once connected
        self.task_key = worker_task(config.worker_id, config.pool)
        self.heartbeat_key = worker_heartbeat(config.worker_id, config.pool)
        self.meter = PeakMeter()

    # ----------------------------------------------------------------- lifecycle
    async def main(self) -> None:
        """Serve until idle past the timeout, retired, or SIGTERM (scale-down, Pod deletion,
        cool-down, our parent exiting): then clean up — report being unused if this worker
        was created for a run it never served, and remove the registration and heartbeat, so
        nothing is left for the scaler to take for a lost worker."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._terminate, asyncio.current_task())
        loop.add_signal_handler(signal.SIGUSR2, _dump_tasks)
        heartbeat: asyncio.Task | None = None
        try:
            if self.stopping:  # stopped while starting up (dagkube.worker held the SIGTERM)
                return
            self.redis = await self.watch.connect()
            self.beats = await self.watch.connect()
            objects = await asyncio.to_thread(store_from_env)  # DAGKUBE_OBJECT_STORE_URL
            self.reader = BulkReader(self.config.redis_url, watch=self.watch, objects=objects)
            self.scripts = Scripts(self.redis, bulk=self.reader)
            await self.reader.open()
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
        self.stopped_at = self.stopped_at or time.time()
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
        ended = self.stopped_at or time.time()
        gb_s = (ended - self.config.spawned_at) * self.config.memory_mib / 1024
        kind = "prewarm_wasted" if self.config.prewarm_run else "workers_unused"
        # Stopped while starting up, it has no connection yet: open one to report.
        redis = self.redis if self.redis is not None else await self.watch.connect()
        try:
            call = AddToRunCall(run_id=run, increments={kind: 1, f"{kind}_gb_s": gb_s})
            await Scripts(redis).add_to_run(call)
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
        """Wait idle for an invocation of this class; None after the idle timeout, or as soon
        as a pre-warmed worker that served nothing is no longer needed by its run."""
        idle = self.pool.idle(self.config.memory_mib)
        await self.redis.sadd(idle, self.config.worker_id)
        idle_until = time.monotonic() + self.config.idle_timeout_s
        unneeded = False
        try:
            raw = None
            # In slices of at most MAX_BLOCK_S: a stopped Redis is noticed by the read timeout.
            # ``stopping`` too: SIGTERM cancels this wait, but a cancellation that lands as
            # the read's own timeout fires can be lost (the call returns or is retried), and
            # the worker must still stop rather than idle on until it is killed.
            while (
                raw is None
                and not unneeded
                and not self.stopping
                and (left := idle_until - time.monotonic()) > 0
            ):
                slice_s = PREWARM_CHECK_S if self._unused_prewarm() else MAX_BLOCK_S
                raw = await self.redis.blmove(
                    self.pool.queue(self.config.memory_mib),
                    self.proc_key,
                    block_timeout(min(left, slice_s)),
                    "LEFT",
                    "RIGHT",
                )
                unneeded = raw is None and await self._prewarm_unneeded()
        finally:
            await self.redis.srem(idle, self.config.worker_id)
        if raw is None:
            if self.stopping:
                return None
            log.info(
                "worker %s: %s, exiting",
                self.config.worker_id,
                f"pre-warmed for run {self.config.prewarm_run} and no longer needed by it"
                if unneeded
                else f"idle for {self.config.idle_timeout_s:.1f}s",
            )
            self.stopping = True
            return None
        invocation = Invocation.from_json(raw)
        if invocation.retire:
            await self.redis.delete(self.proc_key)
            self.stopping = True
            return None
        return invocation

    def _unused_prewarm(self) -> bool:
        """Created by a pre-warm request and has served nothing yet."""
        return self.config.prewarm_run is not None and not self.served_any

    async def _prewarm_unneeded(self) -> bool:
        """An unused pre-warmed worker is no longer needed once its run ended, or once every
        target of the run's pre-warm requests for its class is ready (all its inputs done)
        while nothing waits in its class's queue: other workers took that demand. It then
        exits (its life charged to the run as wasted) instead of idling the full timeout;
        a worker that served something stays in the warm pool as any other."""
        run = self.config.prewarm_run
        if run is None or self.served_any:
            return False
        status = await self.redis.hget(RunKeys(run).meta, "status")
        if status != RunStatus.RUNNING.encode():
            return True
        state = await self._load_run(run)
        if state is None:
            return True
        inputs = sorted(
            {
                dep
                for requests in state.opts.prewarm.values()
                for params in requests
                if params.memory_mib == self.config.memory_mib
                for target in params.targets
                if target in state.dag.tasks
                for dep in state.dag.tasks[target].deps
            }
        )
        # Read together (MULTI): a completion that readies a target queues it in the same step.
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.llen(self.pool.queue(self.config.memory_mib))
            if inputs:
                pipe.smismember(RunKeys(run).done, inputs)
            queued, *done = await pipe.execute()
        return not queued and all(done[0] if done else ())

    # ----------------------------------------------------------------- runs
    async def _load_run(self, run_id: str) -> RunState | None:
        state = self.runs.get(run_id)
        if state is not None:
            self.runs.move_to_end(run_id)
            return state
        keys = RunKeys(run_id)
        held = list(self.runs)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.get(keys.dag)
            pipe.get(keys.plan)
            pipe.hmget(keys.meta, "ttl_s", "history_cap", "submitted_at")
            for other in held:
                pipe.hget(RunKeys(other).meta, "status")
            dag_blob, plan_json, (ttl_s, cap, submitted), *statuses = await pipe.execute()
        # A warm worker held every value of its last runs (outputs, fetched inputs): ended
        # runs' values are dropped here, or a few runs of large outputs outgrow the class.
        for other, status in zip(held, statuses, strict=True):
            if status != b"running":
                del self.runs[other]
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
        prewarmed = not self.served_any and self.config.prewarm_run == invocation.run
        charge = start_charge(
            first=cold,
            spawned_s=self.config.spawned_at,
            queued_s=invocation.queued_at,
            prewarmed=prewarmed,
            taken_s=ready_at,
        )
        cold = charge.cold
        self.served_any = True
        cpu_before = 0.0 if cold else _process_cpu_s()
        state = await self._load_run(invocation.run)
        finish = Finish(served=0)
        serving = None
        if state is not None and status in ("", "running"):
            serving = Serving(self, state, invocation)
            finish = await serving.run()
        finished_at = time.time()
        first_task_at = finish.first_task_at
        record = WorkerRecord(
            run_id=invocation.run,
            worker_id=self.config.worker_id,
            logical_worker=invocation.worker,
            memory_mib=self.config.memory_mib,
            cpu=self.config.cpu,
            cold=cold,
            queued_at=invocation.queued_at or None,
            spawned_at=charge.spawned_s,
            ready_at=ready_at,
            first_task_at=first_task_at,
            finished_at=finished_at,
            tasks_served=finish.served,
            startup_s=(first_task_at - invocation.queued_at)
            if first_task_at and invocation.queued_at
            else None,
            cpu_s_used=_process_cpu_s() - cpu_before,
            resumed=invocation.resume,
            prewarmed=prewarmed,
            registered_at=self.registered_at,
            peak_memory_bytes=serving.peak_bytes if serving else None,
        )
        held_s = max(0.0, finished_at - charge.charged_from_s)
        finished = await self.scripts.finish(
            FinishCall(
                run_id=invocation.run,
                pool=self.config.pool,
                worker_id=self.config.worker_id,
                worker_field=f"{self.config.worker_id}:{ready_at:.6f}",
                worker_record_json=record.model_dump_json(),
                gb_s=held_s * self.config.memory_mib / 1024,
                cpu_s_allocated=held_s * self.config.cpu,
                cpu_s_used=record.cpu_s_used,
                cold=cold,
                prewarmed=prewarmed,
                now=finished_at,
                run_ttl_s=state.ttl_s if state else 3600,
                history_cap=state.history_cap if state else 100,
                next_queue=None if self.stopping else self.pool.queue(self.config.memory_mib),
                amended_records=tuple(serving.amendments if serving else ()),
            )
        )
        if finished.next_invocation is None:
            return None, ""
        invocation = Invocation.from_json(finished.next_invocation)
        if invocation.retire:
            await self.redis.delete(self.proc_key)
            self.stopping = True
            return None, ""
        return invocation, finished.next_run_status or ""

    async def within_timeout(
        self, state: RunState, spec: TaskSpec, running: asyncio.Future, claim: dict[str, Any]
    ) -> Execution:
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


def _process_cpu_s() -> float:
    times = os.times()
    return times.user + times.system


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


def _dump_tasks() -> None:
    """Every asyncio task's chain of awaiting coroutines, to stderr (the worker's log)."""
    for task in asyncio.all_tasks():
        print(f"asyncio task {task.get_name()}:", file=sys.stderr)
        coro: Any = task.get_coro()
        while coro is not None and (frame := getattr(coro, "cr_frame", None)) is not None:
            code = frame.f_code
            print(f"  {code.co_filename}:{frame.f_lineno} in {code.co_name}", file=sys.stderr)
            coro = getattr(coro, "cr_await", None)
    sys.stderr.flush()


def main(argv: Iterable[str] | None = None, *, stopped_at: float | None = None) -> NoReturn:
    """Run a worker until it stops, then exit the process (called by ``python -m
    dagkube.worker``, which waits out the emulated start-up delay first). ``stopped_at``: a
    SIGTERM came before this (during the delay or the imports), so the worker only reports
    being unused (if it was created for a run) and exits."""
    config = parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("DAGKUBE_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s %(levelname)s worker {config.worker_id}: %(message)s",
    )
    # `kill -USR1 <pid>` writes every thread's stack to the log (`kill -USR2` every asyncio
    # task's): a worker that hangs can be looked into without stopping it.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)  # until Worker.main can answer it
    parent = os.environ.get("DAGKUBE_PARENT_PID")
    if parent:
        _die_with_parent(int(parent))
    worker = Worker(config)
    worker.stopped_at = stopped_at
    worker.stopping = stopped_at is not None

    def stop(*_: object) -> None:  # until Worker.main installs its own: nothing to clean up
        worker.stopping = True
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    try:
        asyncio.run(worker.main())
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
