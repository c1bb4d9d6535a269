"""The worker's decisions while it serves one invocation, as a state machine with no I/O.

The I/O shell (``dagkube.runtime.worker``) calls :meth:`InvocationMachine.start`, carries
out the instructions in order, and hands each event they produce to
:meth:`InvocationMachine.handle`, until a :class:`Finish`. The machine decides what runs
next, whether an output is stored, when an upload is delayed, whether an upstream is late
and what to duplicate, and where the ready consumers the COMPLETE step routed to this worker
go in its order (:func:`dagkube.planning.rules.flexible_next`).

================  ==========================  ============================================
event             state                       instructions
================  ==========================  ============================================
(start)           flexible                    ReadDone (resumed) or the first task's
                                              StartPreload, RequestPrewarm, Execute
(start)           bound                       ReadDone (resumed), StartPreload, then the
                                              first ready task or WaitInbox
DoneRead          flexible / bound starting   skip a completed task / set what remains
TaskReady         bound, waiting              CheckDuplicated (a duplicate target) or
                                              RequestPrewarm, Execute
Stop              bound, waiting              Finish
WorkerIdle        bound, waiting              ReadUpstreams (taskdup) or ReadStatus
UpstreamsRead     bound, idle                 ClaimDuplicate (a late upstream) or ReadStatus
DuplicateClaimed  bound, idle                 Execute(duplicate) if won, else the next claim
DuplicatedChecked bound                       Execute, or skip the task
StatusRead        bound, idle                 Finish (run ended) or WaitInbox / next task
(nothing ready)   bound                       CheckTaken (some of its tasks were taken),
                                              Steal (once until something arrives or a
                                              wait ends), then WaitInbox or Finish
Stole             bound                       the tasks taken, run here (outputs stored)
TakenChecked      bound                       forget those done; after TAKEN_POLLS checks
                                              run the others here
Executed          any                         Fail, DelayUpload (delayed-io) or Complete;
                                              bound, next task ready: Complete(overlapped)
                                              and that task's Execute at once
                  an overlapped step said     Finish (the run ended while it executed)
                  the run ended
UploadDelayed     flexible                    Complete
Completed         any                         StoreOutput (kept for another fan-in), then
                                              the next task, ReadStatus or Finish
                  of an overlapped step       nothing: the next task is executing already
Failed            any                         Finish (a duplicate's: ReadStatus)
================  ==========================  ============================================

A bound worker whose next task is ready overlaps the COMPLETE step (and upload) of the task
it executed with the next task's execution: the step's round trip, and a large output's
upload, no longer stand between two tasks. The step names the next task as the worker's
claim, so a worker lost meanwhile is charged with the task it was executing. Only an
output of at most 1/16 of the task's memory is overlapped (:func:`overlaps_step`, which the
timing model follows too): its serialized copy is held while the next task runs.
Tasks that end faster than a step's round trip leave several overlapped steps under way;
the shell sends them together (its group commit), so their ``Completed`` may come after
later ``Executed`` events, and always before the ``Completed`` of a later step that is not
overlapped.

Work stealing (docs/architecture.md): a bound worker with nothing ready takes some of the
ready tasks other bound workers offered (:meth:`RunView.stealable`), from the end of their
order; a worker learns in its ``Completed`` which of its tasks were taken, skips them, and
once nothing else is ready checks whether they are done, running itself those still not
done after TAKEN_POLLS checks (their thief may have been lost).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import replace

from dagkube.planning.model import TaskdupParams
from dagkube.planning.rules import flexible_next, overlaps_step
from dagkube.runtime.workercore import hooks
from dagkube.runtime.workercore.messages import (
    CheckDuplicated,
    CheckTaken,
    ClaimDuplicate,
    Complete,
    Completed,
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
from dagkube.runtime.workercore.run import RunView

# A bound worker whose tasks others took, with nothing else to run, checks this often whether
# they are done, and runs those still not done after TAKEN_POLLS checks (about 2 s) itself.
TAKEN_POLL_S = 0.02
TAKEN_POLLS = 100


class InvocationMachine:
    """One invocation: a flexible one runs its roots depth first with their continuations and
    clustered children; a bound one (``worker`` set) runs the tasks planned for its logical
    worker as their inputs arrive in its inbox, and may duplicate a late upstream."""

    def __init__(
        self,
        run: RunView,
        *,
        roots: Iterable[str],
        worker: str | None,
        resume: bool,
        block_s: float,
    ) -> None:
        self.run = run
        self.me = worker
        self.resume = resume  # re-queued from a lost worker: store every output (a checkpoint)
        self.block_s = block_s  # the longest inbox wait without taskdup candidates
        self.queue: deque[str] = deque(roots)  # flexible: pending roots; bound: ready tasks
        self.remaining: set[str] = set()  # bound: planned tasks not run yet
        self.may_duplicate = False
        self.blocked_since: float | None = None
        self.current: str | None = None
        self.duplicate = False  # the current task is a duplicate of a late upstream
        self.kept_for: str | None = None  # delayed-io kept the current output for this fan-in
        self.claims: deque[tuple[str, TaskdupParams]] = deque()
        self.dup_check_at: float | None = None  # the next taskdup check (Unix s; None: soon)
        self.completing: set[str] = set()  # their COMPLETE is under way (overlapped)
        self.ended = False  # an overlapped COMPLETE said the run no longer runs
        self.served = 0
        self.first_task_at: float | None = None
        # Work stealing: tasks this bound worker took from others (their outputs are stored:
        # their consumers were planned elsewhere), and tasks of its own others took (not run
        # here; polled once nothing else is ready, and run here if not done in time).
        self.stolen: set[str] = set()
        self.taken: set[str] = set()
        self.victims: tuple[str, ...] = ()
        self.steal_tried = False  # nothing to take when last asked, and nothing came since
        self.taken_checks = 0  # checks of taken tasks not all done yet
        self.taken_read = False  # checked since the last wait

    # ------------------------------------------------------------------ entry points
    def start(self) -> list[Instruction]:
        if self.me is None:
            return self._next_flexible()
        if self.resume:
            return [ReadDone(task_id=None)]
        return self._start_bound(frozenset())

    def handle(self, event: Event) -> list[Instruction]:
        """The instructions that follow ``event``, in the order they are to be carried out."""
        match event:
            case DoneRead():
                return self._on_done_read(event)
            case TaskReady():
                self.steal_tried = self.taken_read = False
                self.blocked_since = self.blocked_since or event.waited_from
                self.queue.extend(event.task_ids)
                return self._next_bound()
            case Stop():
                return [self._finish()]
            case WorkerIdle():
                self.steal_tried = False
                self.blocked_since = self.blocked_since or event.waited_from
                if self.taken:
                    self.taken_read = False
                    return self._next_bound()
                return self._on_idle()
            case TakenChecked(done=done):
                return self._on_taken_checked(done)
            case UpstreamsRead():
                return self._on_upstreams(event)
            case DuplicateClaimed():
                return self._on_claimed(event)
            case DuplicatedChecked():
                if event.done:  # a consumer's duplicate already completed it
                    self.remaining.discard(event.task_id)
                    return self._next_bound()
                return self._execute_bound(event.task_id)
            case Stole(task_ids=task_ids):
                self.steal_tried = not task_ids
                self.stolen.update(task_ids)
                self.remaining.update(task_ids)
                self.queue.extend(task_ids)
                return self._next_bound()
            case StatusRead():
                return self._next_bound() if event.running else [self._finish()]
            case Executed():
                return self._on_executed(event)
            case UploadDelayed():
                if event.kept:
                    self.kept_for = self.run.opts.delayed[event.task_id][0]
                return [self._complete(event.task_id)]
            case Completed():
                return self._on_completed(event)
            case Failed():
                return [ReadStatus()] if self.duplicate else [self._finish()]
        raise TypeError(f"the worker core has no rule for {event!r}")

    # ------------------------------------------------------------------ flexible
    def _next_flexible(self) -> list[Instruction]:
        if not self.queue:
            return [self._finish()]
        self.current = self.queue.popleft()
        if self.resume:  # re-queued from a lost worker that may have completed it
            return [ReadDone(task_id=self.current)]
        return self._begin_flexible(self.current)

    def _begin_flexible(self, task_id: str) -> list[Instruction]:
        return [
            *hooks.preload(self.run, "@" + task_id),
            *hooks.prewarm(self.run, task_id),
            self._execute(task_id),
        ]

    # ------------------------------------------------------------------ bound
    def _start_bound(self, done: frozenset[str]) -> list[Instruction]:
        assert self.me is not None
        assigned = self.run.worker_tasks(self.me)
        self.remaining = {t for t in assigned if t not in done}
        if self.resume:
            deps = self.run.dag.tasks
            self.queue.extend(
                t for t in assigned if t in self.remaining and all(d in done for d in deps[t].deps)
            )
        self.may_duplicate = bool(self.remaining.intersection(self.run.opts.dups))
        self.victims = self.run.victims(self.me)
        return [*hooks.preload(self.run, self.me), *self._next_bound()]

    def _next_bound(self) -> list[Instruction]:
        while self.remaining:
            if not self.queue:
                if self.taken and not self.taken_read:  # taken by others: done yet?
                    self.taken_read = True
                    return [CheckTaken(task_ids=tuple(sorted(self.taken)))]
                until = None
                if self.taken:  # not all: poll until they are
                    timeout_s = TAKEN_POLL_S
                elif self.may_duplicate and self.dup_check_at is None:
                    timeout_s = hooks.DUP_POLL_S
                else:
                    timeout_s = self.block_s
                    until = self.dup_check_at if self.may_duplicate else None
                return self._steal() or [WaitInbox(timeout_s=timeout_s, until=until)]
            task_id = self.queue.popleft()
            if task_id not in self.remaining or task_id in self.taken:
                continue
            self.current, self.duplicate = task_id, False
            if task_id in self.run.opts.dup_targets:
                return [CheckDuplicated(task_id=task_id)]
            return self._execute_bound(task_id)
        return self._steal() or [self._finish()]

    def _steal(self) -> list[Instruction]:
        """Nothing ready here: take some of the others' ready tasks (work stealing), once
        until something arrives, a wait times out or a take gave tasks."""
        if not self.victims or self.steal_tried:
            return []
        assert self.me is not None
        self.steal_tried = True
        return [Steal(victims=self.victims, most=self.run.steal_most(self.me))]

    def _on_taken_checked(self, done: frozenset[str]) -> list[Instruction]:
        """Forget the taken tasks that are done; past TAKEN_POLLS checks, run the others
        here (their thief may have been lost)."""
        self.remaining.difference_update(done)
        self.taken.difference_update(done)
        self.taken_checks += 1
        if self.taken and self.taken_checks >= TAKEN_POLLS:
            self.queue.extend(sorted(self.taken))
            self.taken.clear()
        if not self.taken:
            self.taken_checks = 0
        return self._next_bound()

    def _execute_bound(self, task_id: str) -> list[Instruction]:
        blocked_since, self.blocked_since = self.blocked_since, None
        return [
            *hooks.prewarm(self.run, task_id),
            self._execute(task_id, blocked_since=blocked_since),
        ]

    def _on_idle(self) -> list[Instruction]:
        if not self.may_duplicate:
            return [ReadStatus()]
        candidates = hooks.duplicate_candidates(self.run, self.remaining)
        upstreams = tuple(sorted({params.upstream for _, params in candidates}))
        if not upstreams:  # the waiting tasks left have no upstream to duplicate
            return [ReadStatus()]
        self.claims = deque(candidates)
        return [ReadUpstreams(upstreams=upstreams)]

    def _on_upstreams(self, event: UpstreamsRead) -> list[Instruction]:
        """Keep, in order, the candidates whose upstream is late; claim the first."""
        submitted = self.run.submitted_at
        now_s = event.at - submitted
        late: list[tuple[str, TaskdupParams]] = []
        check_at = math.inf
        for consumer, params in self.claims:
            if params.upstream in event.done:
                continue
            started_s = _relative(event.started.get(params.upstream), submitted)
            if hooks.late(params, started_s, now_s):
                late.append((consumer, params))
            else:
                check_at = min(check_at, hooks.next_late_s(params, started_s))
        self.dup_check_at = event.at + max(hooks.DUP_POLL_S, check_at - now_s)
        self.claims = deque(late)
        return self._claim_next()

    def _claim_next(self) -> list[Instruction]:
        if not self.claims:
            return [ReadStatus()]
        consumer, params = self.claims[0]
        return [ClaimDuplicate(upstream=params.upstream, consumer=consumer)]

    def _on_claimed(self, event: DuplicateClaimed) -> list[Instruction]:
        consumer, _ = self.claims.popleft()
        if not event.won:
            return self._claim_next()
        self.claims.clear()
        self.run.duplicated.setdefault(consumer, []).append(event.upstream)
        self.current, self.duplicate = event.upstream, True
        return [*hooks.prewarm(self.run, event.upstream), self._execute(event.upstream)]

    # ------------------------------------------------------------------ any task
    def _execute(self, task_id: str, blocked_since: float | None = None) -> Execute:
        store = self.run.must_store(task_id) or self.resume or task_id in self.stolen
        return Execute(
            task_id=task_id, store=store, duplicate=self.duplicate, blocked_since=blocked_since
        )

    def _on_done_read(self, event: DoneRead) -> list[Instruction]:
        if self.me is not None:
            return self._start_bound(event.done)
        assert self.current is not None
        if self.current in event.done:
            return self._next_flexible()
        return self._begin_flexible(self.current)

    def _on_executed(self, event: Executed) -> list[Instruction]:
        self.served += 1
        if not self.duplicate:
            self.first_task_at = self.first_task_at or event.started_at
            self.remaining.discard(event.task_id)
        if self.ended:  # failed or cancelled while this task ran: nothing to complete
            return [self._finish()]
        if not event.ok:
            return [Fail(task_id=event.task_id)]
        delay = hooks.delayed_io(self.run, event.task_id, self.me)
        if delay is not None:
            return [delay]
        complete = self._complete(event.task_id)
        memory_mib = self.run.plan.tasks[event.task_id].memory_mib
        if complete.next_task is None or not overlaps_step(event.output_bytes, memory_mib):
            return [complete]
        self.completing.add(event.task_id)
        following = self._next_bound()  # the next task's Execute (it is ready, see _next_ready)
        assert following and isinstance(following[-1], Execute), following
        return [replace(complete, overlapped=True), *following]

    def _complete(self, task_id: str) -> Complete:
        if self.me is None:
            return Complete(task_id=task_id, pending=tuple(self.queue))
        return Complete(task_id=task_id, next_task=self._next_ready())

    def _next_ready(self) -> str | None:
        """The task a bound worker will execute next without asking anything first (not a
        duplicate's follow-up, nor a task a duplicate may have completed), if it is ready
        and its claim needs nothing more (a task with a timeout writes its own, with its
        deadline, when it starts)."""
        if self.duplicate:
            return None
        for task_id in self.queue:
            if task_id in self.remaining and task_id not in self.taken:
                if task_id in self.run.opts.dup_targets:
                    return None
                return task_id if self.run.dag.tasks[task_id].timeout_s is None else None
        return None

    def _on_completed(self, event: Completed) -> list[Instruction]:
        running = event.status == "running"
        self.taken.update(t for t in event.taken if t in self.remaining)
        if event.task_id in self.completing:  # overlapped: a later task is executing
            self.completing.discard(event.task_id)
            if running:
                self.queue.extend(event.local_ready)
            else:
                self.ended = True
            return []
        kept_for, self.kept_for = self.kept_for, None
        instructions: list[Instruction] = []
        if kept_for is not None and running and event.continuation != kept_for:
            # Not this worker's fan-in after all (cannot happen unless a duplicate raced):
            # store the output so whoever runs it can read it.
            instructions.append(StoreOutput(task_id=event.task_id))
        if self.duplicate:
            if running:
                self.queue.extend(event.local_ready)
            return [*instructions, ReadStatus()]
        if not running:
            return [*instructions, self._finish()]
        if self.me is None:
            self.queue = deque(flexible_next(event.continuation, event.local_ready, self.queue))
            return [*instructions, *self._next_flexible()]
        self.queue.extend(event.local_ready)
        return [*instructions, *self._next_bound()]

    def _finish(self) -> Finish:
        return Finish(served=self.served, first_task_at=self.first_task_at)


def _relative(started_at: float | None, submitted_at: float) -> float | None:
    return None if started_at is None else started_at - submitted_at
