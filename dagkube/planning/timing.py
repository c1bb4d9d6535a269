"""The timing model: predicted start/end of every task, worker activity, makespan, GB-seconds.

It is a discrete-event simulation of the runtime's own rules, so it predicts what the runtime
will do rather than an idealized schedule (the routing and charging rules are the very
functions the worker follows, :mod:`dagkube.planning.rules`):

* an invocation is queued per class; an idle worker of the class takes it (warm start-up),
  or a new worker is spawned (cold start-up) while under the worker cap, else it waits; the
  first ones are queued in the DAG's order, or the longest path first when the plan says so
  (:func:`~.rules.source_order`), as the launcher queues them;
* a flexible worker continues with the first ready downstream task and queues the others;
  a bound (logical) worker runs the ready tasks assigned to it in arrival order, waits for
  the rest (still allocated, but not counted against the worker cap: it uses no CPU), and
  finishes when all of them are done;
* a worker that finishes an invocation takes the next queued one of its class at once,
  otherwise it is idle until ``idle_timeout_s``, then exits;
* inputs the worker produced or fetched earlier in the run are local (the runtime keeps
  them); others, and large constants it has not fetched yet, are downloaded; an output is
  uploaded when a consumer may run elsewhere or it is a run output (the runtime's rule);
* where workers share the machine's cores (``Predictor.cores``: local workers without CPU
  limits), tasks computing at once share them (:mod:`dagkube.planning.cores`).

Start-up is part of a worker's active period. The seed notes' "circular" computation (warm or
cold needs the active periods, active periods need the start-ups) does not arise here: events
are processed in time order, and whether a start is warm depends only on workers that became
idle earlier, which the simulation already knows. No fixed-point iteration is needed.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Callable

from dagkube.dag import DagSpec, TaskSpec
from dagkube.errors import InvalidOption
from dagkube.planning.cores import End, SharedCores
from dagkube.planning.model import Optimization, OptimizationIndex, output_must_be_stored
from dagkube.planning.predictions import Estimates, Predictor, estimate
from dagkube.planning.rules import (
    Route,
    flexible_next,
    overlaps_step,
    route,
    source_order,
    start_charge,
)
from dagkube.planning.timing_state import (
    SimWorker,
    TaskTiming,
    Timing,
    WorkerActivity,
    summarize,
)
from dagkube.planning.transfers import SMALL_BYTES


class DeadlockError(InvalidOption):
    """The plan cannot finish (e.g. bound workers waiting hold every worker slot)."""


class _Simulation:
    def __init__(
        self,
        dag: DagSpec,
        memory: dict[str, int],
        worker_of: dict[str, str | None],
        predictor: Predictor,
        *,
        max_workers: int | None,
        idle_timeout_s: float,
        warm_pool: dict[int, int] | None,
        memory_per_cpu_mib: int,
        max_cpu: float,
        optimizations: dict[str, list[Optimization]] | None = None,
        sizes: Estimates | None = None,
        longest_first: bool = False,
    ) -> None:
        self.dag = dag
        self.longest_first = longest_first
        self.memory = memory
        self.worker_of = worker_of
        self.p = predictor
        self.max_workers = max_workers
        self.idle_timeout_s = idle_timeout_s
        self.memory_per_cpu_mib = memory_per_cpu_mib
        self.max_cpu = max_cpu
        self.events: list = []
        self.seq = itertools.count()
        self.queues: dict[int, deque] = {}
        self.idle: dict[int, list[SimWorker]] = {}
        self.alive = 0
        self.waiting = 0
        self.numbers = itertools.count()
        self.activities: list[WorkerActivity] = []
        sizes = sizes or estimate(dag, predictor, memory)
        self.out_bytes, self.exec_s = sizes.out_bytes, sizes.exec_s
        self.timing = {t: TaskTiming(output_bytes=self.out_bytes[t]) for t in dag.tasks}
        self.const_bytes = {f"const:{k}": len(v) for k, v in dag.constants.items()}
        self.remaining_deps = {t: len(spec.deps) for t, spec in dag.tasks.items()}
        self.producer: dict[str, SimWorker] = {}
        self.logical_worker: dict[str, SimWorker | None] = {}  # claimed logical ids
        self.logical_tasks: dict[str, set[str]] = {}
        for task_id, logical in worker_of.items():
            if logical is not None:
                self.logical_tasks.setdefault(logical, set()).add(task_id)
        self.inbox: dict[str, list[str]] = {}
        self.done = 0
        self.last_finish = 0.0
        self.cores: SharedCores | None = None
        most = _computing_at_most(worker_of, self.logical_tasks, max_workers, warm_pool)
        if predictor.cores is not None and (most is None or most > predictor.cores):
            self.cores = SharedCores(predictor.cores)
        self.uploads: list[tuple[float, float]] = []  # (end, begin) of uploads, a heap by end
        self.computing_on: dict[str, SimWorker] = {}
        self._optimizations(optimizations or {})
        for memory_mib, count in (warm_pool or {}).items():
            for _ in range(count):
                worker = SimWorker(next(self.numbers), memory_mib, idle_since=0.0)
                self.idle.setdefault(memory_mib, []).append(worker)
                self.alive += 1

    def _optimizations(self, optimizations: dict[str, list[Optimization]]) -> None:
        """What the optimizations change in the model (taskdup is not modelled: a duplicate
        runs only when an upstream is later than predicted, which the model cannot be)."""
        marks = OptimizationIndex.of(optimizations)
        self.clustered = marks.clustered
        self.delayed = marks.delayed
        self.preload = marks.preload
        self.prewarm = marks.prewarm
        self.starting: dict[int, list[SimWorker]] = {}  # spawned, not ready yet
        self.delay_waiting: dict[str, tuple[SimWorker, str]] = {}  # fan-in -> delayed input
        self.overlapping: set[str] = set()  # uploading while their worker runs its next task

    # ------------------------------------------------------------------ events
    def push(self, time_s: float, handler: Callable[..., None], *payload: object) -> None:
        """``handler(time_s, *payload)`` is called at ``time_s`` (ties: in the order pushed)."""
        heapq.heappush(self.events, (time_s, next(self.seq), handler, payload))

    def run(self) -> None:
        order = source_order(self.dag, self.exec_s) if self.longest_first else self.dag.sources
        for task_id in order:
            logical = self.worker_of[task_id]
            if logical is None:
                self.push(0.0, self._on_queue, self.memory[task_id], None, [task_id], None)
            elif logical in self.inbox:
                self.inbox[logical].append(task_id)
            else:  # queued where its first root comes
                self.inbox[logical] = [task_id]
                self.logical_worker[logical] = None
                self.push(0.0, self._on_queue, self.memory[task_id], logical, [], None)
        events, pop = self.events, heapq.heappop
        while events:
            time_s, _, handler, payload = pop(events)
            handler(time_s, *payload)
        if self.done < len(self.dag.tasks):
            stuck = [
                t for t, n in self.remaining_deps.items() if n == 0 and self.timing[t].worker < 0
            ]
            raise DeadlockError(
                f"The plan cannot finish: {len(self.dag.tasks) - self.done} task(s) never run "
                f"(e.g. {', '.join(stuck[:3]) or 'waiting on them'}); with a cap of "
                f"{self.max_workers} workers, bound workers waiting for inputs hold every slot"
            )

    def _on_queue(
        self,
        time_s: float,
        memory_mib: int,
        logical: str | None,
        roots: list[str],
        trigger: str | None,
    ) -> None:
        self.queues.setdefault(memory_mib, deque()).append((logical, roots, trigger, time_s))
        self._dispatch(memory_mib, time_s)

    def _dispatch(self, memory_mib: int, time_s: float) -> None:
        """The scaler's rule: an idle worker takes a queued invocation; else a new worker is
        spawned per invocation not covered by workers already starting (within the cap).
        A spawned worker takes whatever is queued when it is ready, which may be nothing if a
        busy worker of the class freed up and took it first."""
        queue = self.queues.get(memory_mib)
        while queue:
            idle = self.idle.get(memory_mib)
            if idle:
                worker = idle.pop()
                self._take(worker, time_s, time_s + self.p.startup_s(memory_mib, False))
            elif len(self.starting.get(memory_mib, ())) >= len(queue):
                return
            elif self._room():
                self._spawn(memory_mib, time_s, prewarm=False)
            elif not self._retire_other(memory_mib):
                return

    def _room(self) -> bool:
        return self.max_workers is None or self.alive - self.waiting < self.max_workers

    def _spawn(self, memory_mib: int, time_s: float, prewarm: bool) -> None:
        worker = SimWorker(next(self.numbers), memory_mib, spawned_s=time_s, prewarmed=prewarm)
        self.alive += 1
        self.starting.setdefault(memory_mib, []).append(worker)
        startup_s = self.p.startup_s(memory_mib, True, prewarmed=prewarm)
        self.push(time_s + startup_s, self._on_ready, worker)

    def _on_ready(self, time_s: float, worker: SimWorker) -> None:
        self.starting[worker.memory_mib].remove(worker)
        if self.queues.get(worker.memory_mib):
            self._take(worker, time_s, time_s)
        else:  # nothing left for it (or pre-warmed early): idle until used or expired
            self._idle(worker, time_s)

    def _on_prewarm(self, time_s: float, memory_mib: int, count: int) -> None:
        """The scaler creates workers of the class ahead of demand (within the cap)."""
        for _ in range(count):
            if not self._room():
                return
            self._spawn(memory_mib, time_s, prewarm=True)

    def _take(self, worker: SimWorker, time_s: float, ready_s: float) -> None:
        """The worker takes the head of its class queue, counted as the runtime counts it
        (:func:`dagkube.planning.rules.start_charge`; a worker spawned by the simulation is on
        its first invocation until it takes one)."""
        logical, roots, trigger, queued_s = self.queues[worker.memory_mib].popleft()
        spawned, worker.spawned_s = worker.spawned_s, None
        prewarmed = spawned is not None and worker.prewarmed
        worker.prewarmed = False
        charge = start_charge(
            first=spawned is not None,
            spawned_s=spawned,
            queued_s=queued_s,
            prewarmed=prewarmed,
            taken_s=time_s,
        )
        self._begin(worker, logical, roots, charge.cold, charge.charged_from_s, ready_s, trigger)
        assert worker.activity is not None
        worker.activity.prewarmed = prewarmed
        worker.activity.queued_s = queued_s
        worker.activity.ready_s = ready_s

    def _retire_other(self, memory_mib: int) -> bool:
        """At the cap, an idle worker of another class with nothing queued makes room."""
        for other, workers in self.idle.items():
            if other != memory_mib and workers and not self.queues.get(other):
                workers.pop()
                self.alive -= 1
                return True
        return False

    def _begin(
        self,
        worker: SimWorker,
        logical: str | None,
        roots: list[str],
        cold: bool,
        taken_s: float,
        ready_s: float,
        trigger: str | None,
    ) -> None:
        worker.idle_since = None
        worker.logical = logical
        worker.activity = WorkerActivity(worker.number, logical, worker.memory_mib, cold, taken_s)
        self.activities.append(worker.activity)
        if logical is None:
            self._start_task(worker, roots[0], ready_s, trigger)
            return
        self.logical_worker[logical] = worker
        worker.remaining = set(self.logical_tasks[logical])
        worker.ready.extend(self.inbox.pop(logical, []))
        self._next_bound(worker, ready_s, trigger)

    def _next_bound(self, worker: SimWorker, time_s: float, trigger: str | None) -> None:
        if worker.waiting and (worker.ready or not worker.remaining):
            worker.waiting = False
            self.waiting -= 1
        if worker.ready:
            self._start_task(worker, worker.ready.popleft(), time_s, trigger)
        elif not worker.remaining:
            self._finish(worker, time_s)
        elif not worker.waiting:  # wait (allocated) for a task pushed to its inbox
            worker.waiting = True
            self.waiting += 1
            self._dispatch_all(time_s)

    def _start_task(
        self, worker: SimWorker, task_id: str, time_s: float, trigger: str | None
    ) -> None:
        spec = self.dag.tasks[task_id]
        timing = self.timing[task_id]
        timing.worker = worker.number
        timing.start_s = time_s
        timing.trigger = trigger
        timing.download_s, preloaded_s = self._fetch(worker, spec)
        overhead_s = self.p.task_overhead_s(worker.memory_mib, worker.logical is not None)
        exec_start_s = time_s + overhead_s + timing.download_s
        timing.exec_start_s = exec_start_s if exec_start_s >= preloaded_s else preloaded_s
        worker.running = True
        assert worker.activity is not None
        worker.activity.tasks.append(task_id)
        self.producer[task_id] = worker
        if self.prewarm:
            for request in self.prewarm.get(task_id, ()):
                self.push(
                    time_s + request.delay_s, self._on_prewarm, request.memory_mib, request.count
                )
        if self.cores is not None:
            demand = self.p.cpu_fraction(spec.function)
            if demand > 0:
                self.push(timing.exec_start_s, self._on_compute, worker, task_id, demand)
                return
        timing.end_s = timing.exec_start_s + self.exec_s[task_id]
        self._executed(worker, task_id, time_s)

    def _fetch(self, worker: SimWorker, spec: TaskSpec) -> tuple[float, float]:
        """The task's inputs and constants the worker does not hold, now held: the seconds
        it downloads them in the foreground, and when its pre-loads are done (0: none)."""
        held, out_bytes = worker.held, self.out_bytes
        remote = [d for d in spec.deps if d not in held]
        preloaded: set[str] = set()
        if remote and spec.id in self.preload:
            preloaded = self._preloaded(spec.id, worker).intersection(remote)
        fetched = 0
        for dep in remote:
            if dep not in preloaded:
                fetched += out_bytes[dep]
        held.update(remote)
        held.add(spec.id)
        if spec.const_keys:
            constants = [f"const:{k}" for k in spec.const_keys if f"const:{k}" not in held]
            fetched += sum(self.const_bytes[k] for k in constants)
            held.update(constants)
        available = 0.0  # pre-loads run one after another as their inputs complete
        if preloaded:
            for dep in sorted(preloaded, key=lambda d: self.timing[d].complete_s):
                available = max(available, self.timing[dep].complete_s)
                available += self.p.download_s(out_bytes[dep])
        return (self.p.download_s(fetched) if fetched else 0.0), available

    def _on_compute(self, time_s: float, worker: SimWorker, task_id: str, demand: float) -> None:
        assert self.cores is not None
        self.computing_on[task_id] = worker
        self._retime(self.cores.start(time_s, task_id, self.exec_s[task_id], demand))

    def _on_computed(self, time_s: float, task_id: str, version: int) -> None:
        assert self.cores is not None
        moved = self.cores.finish(time_s, task_id, version)
        if moved is None:
            return  # re-timed since this event was pushed
        self.timing[task_id].end_s = time_s
        self._executed(self.computing_on.pop(task_id), task_id, time_s)
        self._retime(moved)

    def _retime(self, ends: list[End]) -> None:
        for time_s, task_id, version in ends:
            self.push(time_s, self._on_computed, task_id, version)

    def _executed(self, worker: SimWorker, task_id: str, now_s: float) -> None:
        """The task's execution ends at its ``end_s``: store its output if it must be stored
        (delayed-io decides later), then complete it (``now_s``: the event being handled)."""
        timing = self.timing[task_id]
        if task_id in self.delayed:
            self.push(timing.end_s, self._on_ended, worker, task_id)
            return
        stored = output_must_be_stored(
            self.dag, task_id, self.worker_of.__getitem__, task_id in self.clustered
        )
        timing.upload_s = self._upload_s(task_id, timing.end_s, now_s) if stored else 0.0
        self._complete_at(timing.end_s + timing.upload_s, worker, task_id)
        if (
            timing.upload_s > 0
            and worker.logical is not None
            and overlaps_step(self.out_bytes[task_id], worker.memory_mib)
        ):
            self.push(timing.end_s, self._on_upload_begun, worker, task_id)

    def _on_upload_begun(self, time_s: float, worker: SimWorker, task_id: str) -> None:
        """A bound worker with its next task ready runs it during the upload (the runtime
        overlaps the COMPLETE step with it: :func:`dagkube.planning.rules.overlaps_step`)."""
        if worker.ready:
            self.overlapping.add(task_id)
            worker.running = False
            self._next_bound(worker, time_s, task_id)

    def _upload_s(self, task_id: str, begin_s: float, now_s: float) -> float:
        """The task's upload from ``begin_s``, sharing the path with the uploads in flight
        then (:func:`dagkube.planning.transfers.upload_sharing`, counted the same way);
        ``now_s``: the time of the event being handled (no upload begins before it)."""
        nbytes = self.out_bytes[task_id]
        if nbytes < SMALL_BYTES:  # its call's latency: not shared, nor counted as sharing
            return self.p.upload_s(nbytes)
        flights = self.uploads
        while flights and flights[0][0] <= now_s:  # no upload timed from now meets them
            heapq.heappop(flights)
        sharing = 1 + sum(1 for end, begin in flights if begin <= begin_s < end)
        seconds = self.p.upload_s(nbytes, sharing)
        heapq.heappush(flights, (begin_s + seconds, begin_s))
        return seconds

    def _complete_at(self, time_s: float, worker: SimWorker, task_id: str) -> None:
        self.timing[task_id].complete_s = time_s
        self.push(time_s, self._on_complete, worker, task_id)

    def _preloaded(self, task_id: str, worker: SimWorker) -> set[str]:
        """Inputs pre-loaded for this task, if it runs where its pre-load host is."""
        entry = self.preload.get(task_id)
        if entry is None:
            return set()
        host, inputs = entry
        if host.startswith("@"):
            return inputs if self.producer.get(host[1:]) is worker else set()
        return inputs if host == worker.logical else set()

    def _on_ended(self, time_s: float, worker: SimWorker, task_id: str) -> None:
        """delayed-io: complete without uploading once the fan-in's other inputs are done
        (this worker then runs the fan-in), or upload after the planned wait."""
        fan_in, wait_s = self.delayed[task_id]
        if self.remaining_deps[fan_in] == 1:
            self._complete_at(time_s, worker, task_id)
        else:
            self.delay_waiting[fan_in] = (worker, task_id)
            self.push(time_s + wait_s, self._on_delay_timeout, worker, task_id, fan_in)

    def _on_delay_timeout(
        self, time_s: float, worker: SimWorker, task_id: str, fan_in: str
    ) -> None:
        if self.delay_waiting.get(fan_in) == (worker, task_id):
            del self.delay_waiting[fan_in]
            upload_s = self._upload_s(task_id, time_s, time_s)
            self.timing[task_id].upload_s = upload_s
            self._complete_at(time_s + upload_s, worker, task_id)

    def _on_complete(self, time_s: float, worker: SimWorker, task_id: str) -> None:
        self.done += 1
        if task_id in self.overlapping:  # its worker may be running the next task already
            self.overlapping.discard(task_id)
        else:
            worker.running = False
        worker.remaining.discard(task_id)
        continuation = None
        clustered: list[str] = []
        remaining = self.remaining_deps
        for down in self.dag.tasks[task_id].downstream:
            left = remaining[down] = remaining[down] - 1
            if left == 1 and down in self.delay_waiting:
                waiting_worker, delayed = self.delay_waiting.pop(down)
                self._complete_at(time_s, waiting_worker, delayed)
            if left:
                continue
            logical = self.worker_of[down]
            where = route(
                producer_worker=worker.logical,
                consumer_worker=logical,
                clustered=task_id in self.clustered,
                continuation_taken=continuation is not None,
            )
            if where is Route.CONTINUE:
                continuation = down
            elif where is Route.LOCAL:
                (clustered if logical is None else worker.ready).append(down)
            elif where is Route.QUEUE:
                self.push(time_s, self._on_queue, self.memory[down], None, [down], task_id)
            else:
                assert logical is not None
                self._to_inbox(logical, down, time_s, task_id)
        if worker.logical is not None:
            if not worker.running:
                self._next_bound(worker, time_s, task_id)
            return
        if continuation is not None or clustered:
            worker.ready = deque(flexible_next(continuation, clustered, worker.ready))
        if worker.ready:
            self._start_task(worker, worker.ready.popleft(), time_s, task_id)
        else:
            self._finish(worker, time_s)

    def _to_inbox(self, logical: str, task_id: str, time_s: float, trigger: str) -> None:
        """A ready task for a bound worker: its invocation is queued with the first one."""
        if logical not in self.logical_worker:
            self.logical_worker[logical] = None
            self.inbox[logical] = [task_id]
            self.push(time_s, self._on_queue, self.memory[task_id], logical, [], trigger)
            return
        owner = self.logical_worker[logical]
        if owner is None:  # queued, not started yet
            self.inbox.setdefault(logical, []).append(task_id)
        else:
            owner.ready.append(task_id)
            if not owner.running:
                self._next_bound(owner, time_s, trigger)

    def _finish(self, worker: SimWorker, time_s: float) -> None:
        assert worker.activity is not None
        worker.activity.end_s = time_s
        self.last_finish = max(self.last_finish, time_s)
        worker.logical = None
        worker.activity = None
        if self.queues.get(worker.memory_mib):  # FINISH takes the next queued one at once
            self._take(worker, time_s, time_s + self.p.handover_s(worker.memory_mib))
            return
        self._idle(worker, time_s)
        self._dispatch_all(time_s)  # its slot may serve another class

    def _idle(self, worker: SimWorker, time_s: float) -> None:
        worker.idle_since = time_s
        self.idle.setdefault(worker.memory_mib, []).append(worker)
        self.push(time_s + self.idle_timeout_s, self._on_expire, worker, time_s)

    def _dispatch_all(self, time_s: float) -> None:
        for memory_mib, queue in self.queues.items():
            if queue:
                self._dispatch(memory_mib, time_s)

    def _on_expire(self, time_s: float, worker: SimWorker, idle_since: float) -> None:
        if worker.idle_since == idle_since and worker in self.idle.get(worker.memory_mib, []):
            self.idle[worker.memory_mib].remove(worker)
            self.alive -= 1
            self._dispatch_all(time_s)

    # ------------------------------------------------------------------ results
    def result(self) -> Timing:
        return summarize(
            self.dag,
            self.timing,
            self.activities,
            self.last_finish,
            self.memory_per_cpu_mib,
            self.max_cpu,
        )


def _computing_at_most(
    worker_of: dict[str, str | None],
    logical_tasks: dict[str, set[str]],
    max_workers: int | None,
    warm_pool: dict[int, int] | None,
) -> int | None:
    """How many tasks can compute at once at most (None: no bound): a worker runs one task
    at a time; a logical worker is one worker at a time; every other worker was alive at the
    start (the warm pool) or spawned under the cap, which waiting bound workers escape. When
    it is at most the cores, they are never shared and the model leaves them out."""
    flexible = len(worker_of) > sum(len(tasks) for tasks in logical_tasks.values())
    if not flexible:
        return len(logical_tasks)
    if max_workers is None:
        return None
    return max(max_workers, sum((warm_pool or {}).values())) + len(logical_tasks)


def simulate(
    dag: DagSpec,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    *,
    max_workers: int | None = None,
    idle_timeout_s: float = 30.0,
    warm_pool: dict[int, int] | None = None,
    optimizations: dict[str, list[Optimization]] | None = None,
    sizes: Estimates | None = None,
    longest_first: bool = False,
) -> Timing:
    """Predict the run of ``dag`` with this class, worker and optimizations per task;
    ``sizes``: its tasks' estimates at these classes, when already made; ``longest_first``:
    the sources queued the longest path first (else in the DAG's order)."""
    simulation = _Simulation(
        dag,
        memory,
        worker_of,
        predictor,
        max_workers=max_workers,
        idle_timeout_s=idle_timeout_s,
        warm_pool=warm_pool,
        memory_per_cpu_mib=predictor.memory_per_cpu_mib,
        max_cpu=predictor.max_cpu,
        optimizations=optimizations,
        sizes=sizes,
        longest_first=longest_first,
    )
    simulation.run()
    timing = simulation.result()
    timing.longest_first = longest_first
    return timing
