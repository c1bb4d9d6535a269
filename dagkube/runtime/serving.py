"""One invocation's I/O shell: turns the worker core's instructions into Redis calls and task
executions, and their results into events for the core (``dagkube.runtime.workercore``)."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dagkube.runtime.execution import run_in_thread
from dagkube.runtime.groupcommit import GroupCommit
from dagkube.runtime.inputs import Preloader, RunState, gather
from dagkube.runtime.invocation import Invocation
from dagkube.runtime.scaler import prewarm_entry
from dagkube.runtime.workercore.machine import InvocationMachine
from dagkube.runtime.workercore.messages import (
    CheckDuplicated,
    CheckTaken,
    ClaimDuplicate,
    Complete,
    Completed,
    DelayUpload,
    DoneRead,
    DuplicateClaimed,
    DuplicatedChecked,
    Event,
    Execute,
    Executed,
    Fail,
    Failed,
    Finish,
    Instruction,
    ReadDone,
    ReadStatus,
    ReadUpstreams,
    RequestPrewarm,
    StartPreload,
    StatusRead,
    Steal,
    Stole,
    Stop,
    StoreOutput,
    TakenChecked,
    TaskReady,
    UploadDelayed,
    UpstreamsRead,
    WaitInbox,
    WorkerIdle,
)
from dagkube.runtime.workercore.run import steal_keep
from dagkube.store.calls import CompleteCall, Completion, FailCall, StealCall, StoreCall
from dagkube.store.connection import MAX_BLOCK_S
from dagkube.store.frames import Serialized
from dagkube.store.keys import RunKeys
from dagkube.store.records import OomAttempt, TaskRecord

if TYPE_CHECKING:
    from dagkube.runtime.worker import Worker

log = logging.getLogger("dagkube.worker")

DELAY_POLL_S = 0.005  # delayed-io: how often the other inputs of the fan-in are checked
# A bound worker takes up to this many ready tasks from its inbox in one read (a packed
# fan-out routes hundreds there at once; one read each was a round trip more per task).
INBOX_READ_MAX = 1024
# Group commit (groupcommit.py): overlapped steps that wait for the one under way go in one
# COMPLETE, up to this many tasks and, together, the output size one overlapped step may
# hold (1/16 of the worker's memory, planning.rules.overlaps_step); past either the worker
# waits for them.
GROUP_MAX_TASKS = 64


@dataclass
class Outcome:
    """An executed task as the shell keeps it until its Complete or Fail is carried out."""

    ok: bool
    record: TaskRecord
    output: Serialized | None = None


class Serving:
    """Serves one invocation: feeds the core its events and carries out its instructions,
    one at a time, until it says :class:`Finish`. Holds what the invocation's tasks share:
    the records still to amend, the OOM attempts it carries, the peak memory seen."""

    def __init__(self, worker: Worker, state: RunState, invocation: Invocation) -> None:
        self.worker = worker
        self.redis = worker.redis
        self.state = state
        self.me = invocation.worker
        self.keys = RunKeys(state.run_id)
        self.machine = InvocationMachine(
            state,
            roots=invocation.roots,
            worker=invocation.worker,
            resume=invocation.resume,
            block_s=MAX_BLOCK_S,
        )
        # Records whose upload time is known only after their COMPLETE: amended in the next
        # call (COMPLETE or the invocation's FINISH).
        self.amendments: list[tuple[str, str]] = []  # (record field, record JSON)
        self.escalations: dict[str, list[OomAttempt]] = {}  # task -> OOM-killed attempts
        for attempt in invocation.escalations:
            self.escalations.setdefault(str(attempt.get("task") or ""), []).append(
                OomAttempt(memory_mib=int(attempt["mem"]), peak_memory_bytes=attempt.get("peak"))
            )
        self.peak_bytes: int | None = None  # of the tasks of this invocation
        self.preloaders: list[Preloader] = []
        self.waiting = False
        self.outcome: Outcome | None = None  # of the task executed last
        self.prewarm: RequestPrewarm | None = None  # sent when its trigger starts
        self.claimed: str | None = None  # the next task, claimed by the last COMPLETE
        # Overlapped steps, sent in groups while the worker executes (group commit).
        self.group: GroupCommit[tuple[Complete, Outcome], Completed] = GroupCommit(
            self._complete,
            max_steps=GROUP_MAX_TASKS,
            max_bytes=worker.config.memory_mib * 2**20 // 16,
            size=lambda step: len(step[1].output or b""),
        )

    async def run(self) -> Finish:
        try:
            instructions: deque[Instruction] = deque(self.machine.start())
            while instructions:
                instruction = instructions.popleft()
                if isinstance(instruction, Finish):
                    await self._flush(instructions)
                    return instruction
                if not isinstance(instruction, Execute | Complete | RequestPrewarm):
                    await self._flush(instructions)  # what follows sees every step landed
                event = await self._carry_out(instruction)
                if isinstance(event, Executed):  # the overlapped steps that landed come first
                    instructions.extend(self._take_landed())
                if event is not None:
                    instructions.extend(self.machine.handle(event))
            raise AssertionError("the worker core ran out of instructions before a Finish")
        finally:
            # the task after them raised: the steps under way still land
            if await self.group.close() is not None:
                log.error("run %s: an overlapped COMPLETE failed", self.state.run_id)
            await self._stop_waiting()
            for preloader in self.preloaders:
                await preloader.stop()

    async def _carry_out(self, instruction: Instruction) -> Event | None:
        worker, state, keys = self.worker, self.state, self.keys
        match instruction:
            case ReadDone(task_id=None):
                done = await self.redis.smembers(keys.done)
                return DoneRead(done=frozenset(m.decode() for m in done))
            case ReadDone(task_id=str(task_id)):
                done_one = await self.redis.sismember(keys.done, task_id)
                return DoneRead(done=frozenset([task_id] if done_one else []))
            case StartPreload(host=host):
                self.preloaders.append(
                    Preloader(self.redis, worker.reader, worker.preload_executor, state, host)
                )
            case RequestPrewarm():
                self.prewarm = instruction
            case Execute():
                return await self._execute(instruction)
            case Fail(task_id=task_id):
                await self._fail()
                return Failed(task_id=task_id)
            case DelayUpload():
                return await self._delay_upload(instruction)
            case Complete(overlapped=True):
                assert self.outcome is not None and instruction.next_task is not None
                self.claimed = instruction.next_task  # the step writes its claim
                await self.group.add((instruction, self.outcome))
            case Complete():
                assert self.outcome is not None
                return await self._complete_after_group(instruction, self.outcome)
            case StoreOutput(task_id=task_id):
                assert self.outcome is not None and self.outcome.output is not None
                outputs = {task_id: self.outcome.output}
                await worker.scripts.store(StoreCall(state.run_id, outputs, state.ttl_s))
            case CheckDuplicated(task_id=task_id):
                await self._stop_waiting()
                return DuplicatedChecked(task_id=task_id, done=await self._started(task_id))
            case WaitInbox(timeout_s=timeout_s, until=until):
                if until is not None:
                    timeout_s = min(timeout_s, until - time.time())
                return await self._wait_inbox(timeout_s)
            case ReadUpstreams(upstreams=upstreams):
                return await self._read_upstreams(list(upstreams))
            case ClaimDuplicate(upstream=upstream):
                return DuplicateClaimed(upstream=upstream, won=await self._claim(upstream))
            case CheckTaken(task_ids=task_ids):
                flags = await self.redis.smismember(keys.done, list(task_ids))
                return TakenChecked(
                    done=frozenset(t for t, flag in zip(task_ids, flags, strict=True) if flag)
                )
            case Steal(victims=victims, most=most):
                stolen = await worker.scripts.steal(
                    StealCall(
                        run_id=state.run_id,
                        thief=self.me or "",
                        victims=victims,
                        most=most,
                        keep=steal_keep(most),
                    )
                )
                return Stole(task_ids=stolen.taken)
            case ReadStatus():
                status = await self.redis.hget(keys.meta, "status")
                return StatusRead(running=status == b"running")
            case _:
                raise TypeError(f"the worker shell cannot carry out {instruction!r}")
        return None

    # ----------------------------------------------------------------- bound workers
    async def _wait_inbox(self, timeout_s: float) -> Event:
        """Block on a bound worker's inbox for up to ``timeout_s`` (not at all if <= 0). While
        blocked it uses no CPU, so it is listed as waiting: the scaler does not count it
        against the worker cap (else bound workers waiting for each other's inputs could hold
        every slot). It stays listed across timeouts until it takes a task
        (:meth:`_stop_waiting`)."""
        assert self.me is not None
        waited_from = time.time()
        inbox = self.keys.inbox(self.me)
        items = await self.redis.lpop(inbox, INBOX_READ_MAX)
        if not items:
            if not self.waiting:
                self.waiting = True
                async with self.redis.pipeline(transaction=False) as pipe:
                    pipe.sadd(self.worker.pool.waiting, self.worker.config.worker_id)
                    pipe.lpush(self.worker.pool.wake, "1")
                    pipe.ltrim(self.worker.pool.wake, 0, 0)
                    await pipe.execute()
            # (a timeout of 0 would block for good: past ``until``, no wait at all)
            popped = await self.redis.blpop(inbox, timeout=timeout_s) if timeout_s > 0 else None
            if popped is None:
                return WorkerIdle(waited_from=waited_from)
            items = [popped[1]]
        task_ids = tuple(item.decode() for item in items)
        if "" in task_ids:  # stop token: the run failed or was cancelled
            return Stop()
        return TaskReady(task_ids=task_ids, waited_from=waited_from)

    async def _stop_waiting(self) -> None:
        if self.waiting:
            self.waiting = False
            await self.redis.srem(self.worker.pool.waiting, self.worker.config.worker_id)

    async def _started(self, task_id: str) -> bool:
        """Before a task a consumer may duplicate: note its start (the consumer's lateness
        test) and say whether a duplicate already completed it."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hsetnx(self.keys.started, task_id, time.time())
            pipe.sismember(self.keys.done, task_id)
            _, done = await pipe.execute()
        return bool(done)

    async def _read_upstreams(self, upstreams: list[str]) -> UpstreamsRead:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.smismember(self.keys.done, upstreams)
            pipe.hmget(self.keys.started, upstreams)
            done_flags, starts = await pipe.execute()
        return UpstreamsRead(
            done=frozenset(u for u, flag in zip(upstreams, done_flags, strict=True) if flag),
            started={u: float(v) for u, v in zip(upstreams, starts, strict=True) if v is not None},
            at=time.time(),
        )

    async def _claim(self, upstream: str) -> bool:
        """taskdup: one claim per task makes sure only one duplicate runs."""
        claim = self.keys.duplicate(upstream)
        worker_id = self.worker.config.worker_id
        if not await self.redis.set(claim, worker_id, nx=True, ex=self.state.ttl_s):
            return False
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.sadd(self.keys.keyset, claim)
            pipe.hincrby(self.keys.meta, "tasks_duplicated", 1)
            await pipe.execute()
        log.info(
            "run %s: %s is late; running a duplicate for %s", self.state.run_id, upstream, self.me
        )
        return True

    # ----------------------------------------------------------------- tasks
    async def _request_prewarm(self, request: RequestPrewarm) -> float:
        """prewarm: ask the scaler for workers of a class, due ``delay_s`` after this start
        (a sorted set scored by due time; the scaler creates them when due)."""
        now = time.time()
        due = now
        pool = self.worker.pool
        async with self.redis.pipeline(transaction=False) as pipe:
            for wanted in request.requests:
                due = now + wanted.delay_s  # < now: the driver sent it at submission
                entry = prewarm_entry(
                    self.state.run_id, wanted.memory_mib, wanted.count, request.trigger
                )
                pipe.zadd(pool.prewarm, {entry: due})
            pipe.lpush(pool.wake, "1")
            pipe.ltrim(pool.wake, 0, 0)
            await pipe.execute()
        return due

    async def _execute(self, instruction: Execute) -> Executed:
        await self._stop_waiting()
        worker, state, task_id = self.worker, self.state, instruction.task_id
        blocked_since = instruction.blocked_since
        blocked_s = time.time() - blocked_since if blocked_since else 0.0
        spec = state.dag.tasks[task_id]
        ready_at = time.time()
        prewarm, self.prewarm = self.prewarm, None
        prewarm_at = await self._request_prewarm(prewarm) if prewarm is not None else None
        # What the worker runs now: a worker killed for memory is charged to this task (the
        # REQUEUE script reads it; COMPLETE clears it).
        claim = self._claim_of(task_id)
        claimed, self.claimed = self.claimed, None
        if claimed != task_id:  # else the last task's COMPLETE wrote it
            await self.redis.set(worker.task_key, json.dumps(claim), ex=state.ttl_s)
        inputs = await gather(state, spec, worker.reader, worker.scripts, worker.executor)
        preloaded = [d for d in spec.deps if d in state.preloaded]
        loop = asyncio.get_running_loop()
        running = loop.run_in_executor(
            worker.executor, run_in_thread, state, spec, inputs.raw, instruction.store, worker.meter
        )
        if spec.timeout_s is None:
            done = await running
        else:
            done = await worker.within_timeout(state, spec, running, claim)
        if done.peak_bytes is not None:
            self.peak_bytes = max(self.peak_bytes or 0, done.peak_bytes)
        record = TaskRecord(
            run_id=state.run_id,
            task_id=task_id,
            function=spec.function,
            worker_id=worker.config.worker_id,
            logical_worker=self.me,
            memory_mib=worker.config.memory_mib,
            ready_at=ready_at,
            inputs_ready_at=done.inputs_ready_at,
            started_at=done.started_at,
            ended_at=done.ended_at,
            input_bytes=done.input_bytes,
            input_wait_s=done.inputs_ready_at - ready_at,
            download_s=inputs.download_s,
            download_bytes=inputs.download_bytes,
            output_bytes=done.output_bytes,
            output_stored=instruction.store and done.error is None,
            cpu_s=done.cpu_s,
            retries=done.attempts - 1,
            recomputed=inputs.recomputed,
            error=done.error,
            blocked_s=blocked_s,
            preloaded=preloaded,
            preload_s=sum(state.preloaded[d] for d in preloaded),
            duplicate=instruction.duplicate,
            duplicated=state.duplicated.get(task_id, []),
            prewarm_at=prewarm_at,
            prewarm_targets=[t for r in prewarm.requests for t in r.targets] if prewarm else [],
            peak_memory_bytes=done.peak_bytes,
            oom_attempts=[] if instruction.duplicate else self.escalations.get(task_id, []),
        )
        self.outcome = Outcome(ok=done.error is None, record=record, output=done.output)
        return Executed(
            task_id=task_id,
            ok=self.outcome.ok,
            started_at=record.started_at,
            output_bytes=len(done.output) if done.output is not None else 0,
        )

    def _claim_of(self, task_id: str) -> dict[str, Any]:
        spec = self.state.dag.tasks[task_id]
        return {"run": self.state.run_id, "task": task_id, "function": spec.function}

    async def _delay_upload(self, instruction: DelayUpload) -> UploadDelayed:
        """delayed-io: wait (up to the planned time) for the fan-in's other inputs; when they
        are all done, this worker runs the fan-in next, so the output need not be uploaded."""
        assert self.outcome is not None
        record = self.outcome.record
        deadline = time.monotonic() + instruction.wait_s
        while True:
            if all(await self.redis.smismember(self.keys.done, list(instruction.others))):
                record.delayed_io = "kept"
                record.output_stored = False
                return UploadDelayed(task_id=record.task_id, kept=True)
            if time.monotonic() >= deadline:
                record.delayed_io = "uploaded"
                return UploadDelayed(task_id=record.task_id, kept=False)
            await asyncio.sleep(DELAY_POLL_S)

    # ----------------------------------------------------------------- COMPLETE
    def _take_landed(self) -> list[Instruction]:
        """The core's instructions for the overlapped steps that landed (none: they only
        add to its queue or end the run)."""
        return [i for event in self.group.take() for i in self.machine.handle(event)]

    async def _flush(self, instructions: deque[Instruction]) -> None:
        """Wait until every overlapped step has landed and hand the core their events."""
        await self.group.drain()
        instructions.extendleft(reversed(self._take_landed()))

    async def _complete_after_group(self, instruction: Complete, outcome: Outcome) -> Completed:
        """A step that is not overlapped: the overlapped ones waiting go with it (after the
        one under way has landed), and their events reach the core first."""
        await self.group.drain()
        steps = [*self.group.take_waiting(), (instruction, outcome)]
        stray = self._take_landed()
        *earlier, last = await self._complete(steps)
        stray += [i for event in earlier for i in self.machine.handle(event)]
        assert not stray, f"an overlapped step gave the core instructions: {stray!r}"
        return last

    async def _complete(self, group: list[tuple[Complete, Outcome]]) -> list[Completed]:
        """One COMPLETE for ``group``'s tasks, in the order they executed; the last one's
        instruction says what the worker runs next (its claim) and what stays pending."""
        worker, state = self.worker, self.state
        instruction = group[-1][0]
        completions: list[Completion] = []
        stored: list[tuple[TaskRecord, str, int]] = []  # record, field, output bytes
        for _, outcome in group:
            record = outcome.record
            store = outcome.output is not None and record.output_stored
            field_name = record.task_id + ("@dup" if record.duplicate else "")
            completions.append(
                Completion(
                    task_id=record.task_id,
                    record_json=record.model_dump_json(),
                    record_field=field_name,
                    output=outcome.output if store else None,
                    now=record.ended_at,
                    downstream=state.downstream(record.task_id),
                    offered=self._offered(record),
                )
            )
            if store and outcome.output is not None:
                stored.append((record, field_name, len(outcome.output)))
        following = instruction.next_task
        next_claim = json.dumps(self._claim_of(following)) if following is not None else ""
        started = time.perf_counter()
        reply = await worker.scripts.complete(
            CompleteCall(
                run_id=state.run_id,
                pool=worker.config.pool,
                worker_id=worker.config.worker_id,
                logical_worker=self.me,
                memory_mib=worker.config.memory_mib,
                run_ttl_s=state.ttl_s,
                completions=completions,
                amended_records=tuple(self.amendments),
                pending_roots=instruction.pending,
                next_claim=next_claim,
            )
        )
        call_s = time.perf_counter() - started
        self.amendments.clear()
        if not instruction.overlapped and next_claim and reply.running:
            self.claimed = following  # the step wrote its claim
        # The uploads rode on this call (a large output: in the same round trip, just before
        # it): amend the records in the next call with their share of its time.
        total = sum(size for _, _, size in stored) or 1
        for record, field_name, size in stored:
            record.upload_s = call_s * size / total
            self.amendments.append((field_name, record.model_dump_json()))
        *earlier, last = completions
        events = [
            Completed(task_id=c.task_id, status=reply.status, continuation=None) for c in earlier
        ]
        events.append(
            Completed(
                task_id=last.task_id,
                status=reply.status,
                continuation=reply.continuation,
                local_ready=reply.local_ready,
                taken=reply.taken,
            )
        )
        return events

    def _offered(self, record: TaskRecord) -> bool:
        """The task was in this worker's offers list (work stealing): it ran on its planned
        worker, and its COMPLETE withdraws it."""
        task_id = record.task_id
        planned = self.state.plan.tasks[task_id].worker_id
        return planned is not None and planned == self.me and self.state.stealable(task_id)

    async def _fail(self) -> None:
        assert self.outcome is not None
        record = self.outcome.record
        assert record.error is not None
        error = {
            "task_id": record.task_id,
            "function": record.function,
            "exc_type": record.error.exc_type,
            "message": record.error.message,
            "traceback": record.error.traceback,
            "worker_id": self.worker.config.worker_id,
        }
        await self.worker.scripts.fail(
            FailCall(
                run_id=self.state.run_id,
                task_id=record.task_id,
                record_json=record.model_dump_json(),
                error_json=json.dumps(error),
            )
        )
        log.error(
            "run %s: task %s failed: %s: %s",
            self.state.run_id,
            record.task_id,
            record.error.exc_type,
            record.error.message,
        )
