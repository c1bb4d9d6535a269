"""The planners' choices: ``wukong``, ``uniform`` and ``non-uniform`` (DESIGN "Planners").

Each chooses a memory class and a worker per task (a :class:`Choice`, with its predicted
schedule); :mod:`~dagkube.planning.choice` then applies the optimizations that the timing
model predicts to help, and :mod:`~dagkube.planning.assembly` turns the result into a Plan.
"""

from __future__ import annotations

import heapq
import itertools
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from dagkube.dag import DagSpec
from dagkube.planning.assembly import CALIBRATION_RUNS, Choice, simulate_plan
from dagkube.planning.estimates import SharedEstimates
from dagkube.planning.fitting import statistic
from dagkube.planning.history import Residual
from dagkube.planning.objective import MAKESPAN_TOLERANCE, Prediction
from dagkube.planning.options import PlanningOptions
from dagkube.planning.rules import overlaps_step
from dagkube.planning.timing import Timing


@dataclass(frozen=True)
class Packing:
    """Where :func:`assign_workers` packs tiny tasks: ``workers`` run at once at most (the
    cap), a task predicted to run in ``tiny_s`` or less costs less than an invocation, and
    each packed task costs ``task_s`` on its worker besides its execution (the balancing
    counts it: with no-ops, it is most of a worker's load)."""

    workers: int
    tiny_s: float
    task_s: float = 0.0  # what a packed task costs besides its execution (its overhead)
    # Per task, the upload of its output that a bound worker overlaps with its next task
    # (rules.overlaps_step) and an invocation of its own pays before its worker is free:
    # with these, a task is tiny up to tiny_s plus its upload.
    hidden_s: Mapping[str, float] | None = None


MIN_GB_S_SAVING = 0.01  # non-uniform: a downgrade must save at least this share of the GB-s
STALE_HALVINGS = 2  # non-uniform: halvings of a round in a row without progress: it stops
HALVING_PROGRESS = 0.1  # non-uniform: the share of the time over the limit a halving must cut
# uniform under a worker cap: a task whose own invocation (a warm start and a handover) would
# cost at least this share of its predicted time is also tried packed into as many workers
# as the cap runs at once, like the tiny ones (assign_workers)
SHORT_PACK_SHARE = 0.1
# non-uniform: once a workflow has CALIBRATION_RUNS runs behind it, a downgraded worker's
# tasks must keep as slack the share of the predicted makespan by which its runs came out
# later than predicted: the p90 of their actual / predicted makespans over the median,
# minus 1, at least MIN_DOWNGRADE_LATENESS, at most MAX_DOWNGRADE_LATENESS. Tasks vary run
# to run: a downgrade the model put a few tens of milliseconds off the critical path (a cold
# start of the smaller class, its slower CPU) landed on it in most runs of a noisy workflow,
# and the saving in GB-s cost makespan. The floor: the measured spread alone (a few % on the
# shapes benchmark, whose task times vary with CV 0.3) let a downgrade cost 15% on SoyKB.
MIN_DOWNGRADE_LATENESS = 0.1
MAX_DOWNGRADE_LATENESS = 0.25


def lateness(residuals: Sequence[Residual]) -> float:
    """How much later than predicted a run of this workflow may come out, a share of its
    predicted makespan (see MIN_DOWNGRADE_LATENESS); 0 without enough runs to tell."""
    ratios = [r.ratio for r in residuals if r.ratio is not None]
    if len(ratios) < CALIBRATION_RUNS:
        return 0.0
    spread = statistic(ratios, 90) / statistic(ratios, 50) - 1.0
    return min(max(spread, MIN_DOWNGRADE_LATENESS), MAX_DOWNGRADE_LATENESS)


def default_class(classes_mib: list[int]) -> int:
    """The class a single-class planner uses: the middle one (the lower middle for even counts)."""
    ordered = sorted(classes_mib)
    return ordered[(len(ordered) - 1) // 2]


def _fit_floors(
    dag: DagSpec, classes: list[int], memory: int, floors: dict[str, int]
) -> tuple[int, list[str]]:
    """One class for every task: ``memory``, raised to hold every task's floor."""
    notes: list[str] = []
    largest = max(classes)
    needing = max(floors, key=floors.__getitem__, default=None)
    if needing is None or floors[needing] <= memory:
        return memory, notes
    fitting = [c for c in classes if c >= floors[needing]]
    raised = min(fitting) if fitting else largest
    hint = dag.tasks[needing].min_memory_mib or 0
    if hint >= floors[needing]:
        notes.append(f"min_memory hints raised the class to {raised} MiB")
    else:
        notes.append(
            f"predicted peak memory raised the class to {raised} MiB (task {needing} needs "
            f"{floors[needing]} MiB with headroom)"
        )
    notes += _over_largest(floors, largest)
    return raised, notes


def _over_largest(floors: dict[str, int], largest: int) -> list[str]:
    over = sorted(t for t, f in floors.items() if f > largest)
    if not over:
        return []
    return [
        f"{len(over)} task(s) predicted to need more than the largest class ({largest} MiB), "
        f"e.g. {over[0]} ({floors[over[0]]} MiB): they may be OOM-killed"
    ]


# ---------------------------------------------------------------------- wukong
def choose_wukong(shared: SharedEstimates, options: PlanningOptions) -> Choice:
    """One class (the middle one), every task on a flexible worker."""
    dag = shared.dag
    middle = default_class(options.classes_mib)
    memory, fit_notes = _fit_floors(dag, options.classes_mib, middle, shared.floors())
    notes = [f"wukong: every task on a flexible worker of class {memory} MiB", *fit_notes]
    per_task = dict.fromkeys(dag.tasks, memory)
    flexible: dict[str, str | None] = dict.fromkeys(dag.tasks)
    timing = simulate_plan(shared, per_task, flexible, options)
    return Choice("wukong", per_task, flexible, timing, notes, sizes=shared.at_class(memory))


# ---------------------------------------------------------------------- uniform
def assign_workers(
    dag: DagSpec,
    exec_s: dict[str, float],
    out_bytes: dict[str, int],
    cluster_size: int,
    transfer_s: Callable[[int], float],
    preload: bool = False,
    packing: Packing | None = None,
    spread: bool = True,
) -> dict[str, str | None]:
    """Logical worker per task from predicted times and sizes (DESIGN "uniform").

    1->1 edges stay on the upstream's worker. In a fan-out (and among source tasks) the child
    leading the longest remaining path (largest bottom level) continues on the upstream's
    worker: the seed notes list "first upstream worker" as a flaw, since a critical task must
    not queue behind short ones, and the upstream's worker then carries the critical path
    alone (so non-uniform can downgrade the others). Of the other children, short ones
    (<= the median predicted time, largest outputs first) are grouped ``cluster_size`` to a
    new worker, long ones get workers of their own. A fan-in goes to the worker of its
    critical-path upstream (the one predicted to finish last: it starts the fan-in without
    waiting, and no other worker idles allocated until then), unless another worker holds
    inputs whose transfer would cost more than max(10 ms, 10% of the fan-in's time) extra —
    except with ``preload``, which fetches those inputs while the critical upstream still runs.
    With ``spread``, several fan-ins that would follow the same critical upstream (a stage
    whose every task reads one shared input and others) are spread rather than queued one
    after another on its worker: with ``packing``, balanced into as many workers as the cap
    runs at once (the first is the upstream's, loaded with the critical one and the path after
    it, which follows it there), else placed as that upstream's fan-out. Whether that pays
    depends on what more workers cost (:func:`choose_uniform` asks the timing model).

    With ``packing`` (a worker cap), tiny children — each predicted to run shorter than an
    invocation of its own costs — are packed into as many workers as the cap lets run at once
    (the first on the upstream's worker, counting the longer child it goes on with),
    balanced by predicted time: more workers could not run them sooner, and each further
    invocation adds its cost to the fan-out.
    """
    counter = itertools.count()
    worker_of: dict[str, str | None] = {}
    finish: dict[str, float] = {}

    def new_worker() -> str:
        return f"w{next(counter)}"

    bottom: dict[str, float] = {}  # longest predicted path from a task to the end
    for task_id in reversed(list(dag.tasks)):
        after = [bottom[d] for d in dag.tasks[task_id].downstream]
        bottom[task_id] = exec_s[task_id] + max(after, default=0.0)

    def place_group(children: list[str], parent_worker: str | None) -> None:
        tiny: list[str] = []
        if packing is not None and len(children) > 2 * packing.workers:
            tiny = [c for c in children if is_tiny(c, packing.tiny_s)]
            if len(tiny) <= 2 * packing.workers:
                tiny = []
            elif len(tiny) == len(children):
                pack(tiny, parent_worker, packing.workers, 0.0)
                return
            packed = set(tiny)
            children = [c for c in children if c not in packed]
        leader = max(children, key=lambda c: bottom[c])
        worker_of[leader] = parent_worker or new_worker()
        if tiny:  # the leader's worker takes tiny ones too, as far as its load leaves room
            assert packing is not None
            pack(tiny, worker_of[leader], packing.workers, exec_s[leader] + packing.task_s)
        others = [c for c in children if c != leader]
        if not others:
            return
        median = statistics.median(exec_s[c] for c in others)
        short = sorted((c for c in others if exec_s[c] <= median), key=lambda c: -out_bytes[c])
        group = ""
        for index, child in enumerate(short):
            if index % cluster_size == 0:
                group = new_worker()
            worker_of[child] = group
        for child in others:
            if exec_s[child] > median:
                worker_of[child] = new_worker()

    def is_tiny(task_id: str, tiny_s: float) -> bool:
        """Short, and nothing stays on its worker after it (its downstream are fan-ins)."""
        hidden = packing.hidden_s.get(task_id, 0.0) if packing and packing.hidden_s else 0.0
        return exec_s[task_id] <= tiny_s + hidden and _feeds_only_fan_ins(dag, task_id)

    def pack(tiny: list[str], first: str | None, workers: int, first_load: float) -> None:
        """Tiny children into ``workers`` groups, longest first to the least loaded; the
        first group is ``first`` (when given), already loaded with ``first_load``."""
        groups = [first or new_worker()] + [new_worker() for _ in range(workers - 1)]
        loads = [(first_load, 0)] + [(0.0, index) for index in range(1, workers)]
        heapq.heapify(loads)
        cost = packing.task_s if packing is not None else 0.0
        for child in sorted(tiny, key=lambda c: -exec_s[c]):
            load, index = heapq.heappop(loads)
            worker_of[child] = groups[index]
            heapq.heappush(loads, (load + exec_s[child] + cost, index))

    def critical_upstream(task_id: str) -> str:
        return max(dag.tasks[task_id].deps, key=lambda d: finish[d])

    def fan_in_worker(task_id: str) -> tuple[str | None, bool]:
        """Where a fan-in goes, and whether that is its critical upstream's worker."""
        placed: dict[str | None, int] = {}
        for dep in dag.tasks[task_id].deps:
            owner = worker_of[dep]
            placed[owner] = placed.get(owner, 0) + out_bytes[dep]
        total = sum(placed.values())
        best = max(placed, key=lambda w: placed[w])
        on_path = worker_of[critical_upstream(task_id)]
        extra = transfer_s(total - placed[on_path]) - transfer_s(total - placed[best])
        keep_path = preload or extra <= max(0.01, 0.1 * exec_s[task_id])
        return (on_path, True) if keep_path else (best, False)

    def follows(task_id: str, anchor: str) -> bool:
        """A fan-in whose inputs are all placed, that would follow ``anchor``'s worker and
        after which nothing stays on its worker (its downstream are fan-ins too): spread,
        it adds no chain of tasks to another worker."""
        deps = dag.tasks[task_id].deps
        return (
            task_id not in worker_of
            and len(deps) > 1
            and _feeds_only_fan_ins(dag, task_id)
            and all(d in finish for d in deps)
            and critical_upstream(task_id) == anchor
            and fan_in_worker(task_id)[1]
        )

    scanned: set[str] = set()  # upstreams whose fan-ins were looked over (once each)
    place_group(dag.sources, None)
    for task_id, spec in dag.tasks.items():
        if task_id not in worker_of:  # a fan-in: placed when all its inputs are placed
            target, on_path = fan_in_worker(task_id)
            anchor = critical_upstream(task_id)
            siblings: list[str] = []
            if spread and on_path and anchor not in scanned:
                scanned.add(anchor)
                siblings = [c for c in dag.tasks[anchor].downstream if follows(c, anchor)]
            if len(siblings) > 1:
                # Fan-ins of the same critical upstream (e.g. every task of a stage reading a
                # shared index and its own chunk) are that upstream's fan-out, placed as one:
                # queued all on its worker, they would run one after another. Under a cap,
                # into as many workers as it runs at once, balanced (a worker each would
                # cost hundreds of starts on a large stage of short tasks).
                if packing is not None:
                    # The critical one stays on the upstream's worker, which the fan-in they
                    # feed will follow: that worker starts loaded with both.
                    leader = max(siblings, key=lambda c: bottom[c])
                    worker_of[leader] = target
                    rest = [c for c in siblings if c != leader]
                    # The path after the leader loads its worker, unless it waits for all
                    # the rest anyway (a fan-in of the whole stage, as a gather is): it then
                    # runs after all of them, and counting it would leave that worker idle.
                    others = set(rest)
                    waits = all(
                        others.issubset(dag.tasks[after].deps)
                        for after in dag.tasks[leader].downstream
                    )
                    load = (exec_s[leader] if waits else bottom[leader]) + packing.task_s
                    pack(rest, target, min(packing.workers, len(siblings)), load)
                else:
                    place_group(siblings, target)
            else:
                worker_of[task_id] = target
        finish[task_id] = max((finish[d] for d in spec.deps), default=0.0) + exec_s[task_id]
        single_input = [d for d in spec.downstream if len(dag.tasks[d].deps) == 1]
        if single_input:
            place_group(single_input, worker_of[task_id])
    return worker_of


def _feeds_only_fan_ins(dag: DagSpec, task_id: str) -> bool:
    """Nothing stays on the task's worker after it: its downstream tasks are all fan-ins."""
    return all(len(dag.tasks[d].deps) > 1 for d in dag.tasks[task_id].downstream)


def _shares_fan_ins(dag: DagSpec) -> bool:
    """Has a task two or more fan-ins downstream after which only fan-ins follow (what
    :func:`assign_workers` may spread)? Checked first: most DAGs have none, and a second
    assignment costs a tenth of a second at 10,000 tasks."""
    for spec in dag.tasks.values():
        found = 0
        for child in spec.downstream:
            if len(dag.tasks[child].deps) > 1 and _feeds_only_fan_ins(dag, child):
                found += 1
                if found > 1:
                    return True
    return False


def choose_uniform(
    shared: SharedEstimates,
    options: PlanningOptions,
    *,
    preload: bool = False,
    differs_from: Choice | None = None,
    memory_mib: int | None = None,
) -> Choice | None:
    """One class (the largest given, else ``memory_mib``, which every task's floor must
    fit), logical workers assigned from predictions; with ``preload``, fan-ins placed for
    pre-loading (see :func:`assign_workers`). None when the workers are those of
    ``differs_from``, another uniform choice (nothing to predict again)."""
    dag = shared.dag
    largest = max(options.classes_mib)  # no floor can raise the largest class
    memory_mib = memory_mib or largest
    memory = dict.fromkeys(dag.tasks, memory_mib)
    sizes = shared.at_class(memory_mib)
    predictor = shared.predictor
    packing = None
    hidden: dict[str, float] = {}
    if options.max_workers is not None:
        # A task of its own invocation costs a start on a warm worker and a handover more.
        tiny_s = predictor.startup_s(memory_mib, False) + predictor.handover_s(memory_mib)
        task_s = predictor.task_overhead_s(memory_mib, bound=True)
        packing = Packing(options.max_workers, tiny_s, task_s)
        # Only the tasks the uploads make tiny: with none, the packed placement is the plain.
        hidden = {
            task_id: upload_s
            for task_id, nbytes in sizes.out_bytes.items()
            if nbytes
            and sizes.exec_s[task_id] > tiny_s
            and overlaps_step(nbytes, memory_mib)
            and sizes.exec_s[task_id] <= tiny_s + (upload_s := predictor.upload_s(nbytes))
        }

    def assigned(spread: bool, packed: bool = False, short: bool = False) -> dict[str, str | None]:
        placing = packing
        if placing is not None and packed:
            placing = replace(placing, hidden_s=hidden)
        if placing is not None and short:
            placing = replace(placing, tiny_s=placing.tiny_s / SHORT_PACK_SHARE)
        return assign_workers(
            dag,
            sizes.exec_s,
            sizes.out_bytes,
            options.cluster_size,
            predictor.download_s,
            preload,
            placing,
            spread=spread,
        )

    plain = assigned(False)
    spread_out = assigned(True) if _shares_fan_ins(dag) else plain
    candidates = [plain] if spread_out == plain else [plain, spread_out]
    if differs_from is not None:  # the same kind of placement as that choice's, or nothing
        if differs_from.packed or differs_from.short:
            candidates = [
                assigned(differs_from.spread, packed=differs_from.packed, short=differs_from.short)
            ]
        else:
            candidates = [spread_out if differs_from.spread else plain]
        if candidates[0] == differs_from.worker_of:
            return None
    floors = shared.floors()
    _, fit_notes = _fit_floors(dag, options.classes_mib, memory_mib, floors)
    worker_of = candidates[0]
    timing = simulate_plan(shared, memory, worker_of, options)
    simulations = 1
    notes = []

    def tried(what: str, trial_of: dict[str, str | None]) -> bool:
        """Simulate another placement; keep it (and say so) only if predicted better."""
        nonlocal worker_of, timing, simulations
        trial = simulate_plan(shared, memory, trial_of, options)
        simulations += 1
        goal = options.goal()
        after = Prediction(trial.makespan_s, trial.gb_s)
        before = Prediction(timing.makespan_s, timing.gb_s)
        kept = goal.better(after, before)
        notes.append(f"{what}: {goal.versus(after, before)}: {'kept' if kept else 'not kept'}")
        if kept:
            worker_of, timing = trial_of, trial
        return kept

    # Fan-ins of one upstream spread over more workers (see assign_workers): kept only when
    # the timing model predicts it better, since each further worker costs a start.
    if len(candidates) > 1:
        tried("fan-ins of one upstream spread", spread_out)
    spread = worker_of is spread_out and spread_out != plain
    packed = False
    if hidden and differs_from is None:
        # Tasks whose upload a bound worker would hide behind the next task (and an
        # invocation of their own would wait for) packed too: kept only when predicted
        # better, since fewer, longer workers balance less well when times vary.
        trial_of = assigned(spread, packed=True)
        if trial_of != worker_of:
            packed = tried("tasks whose uploads overlap the next task packed", trial_of)
    short = False
    if packing is not None and differs_from is None:
        # Short tasks packed too: each invocation of its own costs a start and a handover
        # (about 5 ms a task on RNA-seq-1000's 945 tasks of 28 ms on average: 8% of the
        # run). Kept only when predicted better, like the packing above.
        trial_of = assigned(spread, packed=packed, short=True)
        if trial_of != worker_of:
            short = tried(
                f"short tasks packed (an invocation of their own >= {SHORT_PACK_SHARE:.0%} "
                "of their time)",
                trial_of,
            )
    workers = len(set(worker_of.values()))
    notes = [f"uniform: {workers} logical workers of class {memory_mib} MiB", *notes, *fit_notes]
    variant = "" if memory_mib == largest else f"{memory_mib}Mi"
    return Choice(
        "uniform",
        memory,
        worker_of,
        timing,
        notes,
        sizes=sizes,
        floors=floors,
        simulations=simulations,
        variant=variant,
        spread=spread,
        packed=packed,
        short=short,
    )


# ---------------------------------------------------------------------- non-uniform
def choose_non_uniform(
    shared: SharedEstimates,
    options: PlanningOptions,
    uniform: Choice,
    max_simulations: int | None = None,
) -> Choice:
    """Start from the ``uniform`` choice (every worker on the largest class), then downgrade
    workers off the critical path one class at a time while the predicted makespan does not
    grow, and never below a task's memory floor (its ``min_memory`` hint, its predicted peak
    plus headroom). At most ``max_simulations`` trial schedules (None: no limit).

    Candidates are chosen from the slack of their tasks (latest minus earliest finish in the
    predicted schedule), largest GB-seconds first, so one full simulation checks a whole
    round of downgrades; a round that grows the makespan is halved until it does not, and
    workers it would leave with less slack than runs came out late by (:func:`lateness`) are
    taken out of it.
    The downgrades are kept only if the objective asked for prefers the result to ``uniform``.
    """
    classes = sorted(options.classes_mib)
    assert uniform.sizes is not None and uniform.floors is not None
    tasks_of: dict[str, list[str]] = {}
    for task_id, logical in uniform.worker_of.items():
        tasks_of.setdefault(str(logical), []).append(task_id)
    search = _Downgrades(
        shared=shared,
        options=options,
        classes=classes,
        worker_of=uniform.worker_of,
        tasks_of=tasks_of,
        floor=uniform.floors,
        memory=dict(uniform.memory),
        timing=uniform.timing,
        max_simulations=max_simulations,
        lateness=lateness(options.history.residuals),
    )
    baseline = uniform.timing.makespan_s
    search.run(limit=baseline * (1 + MAKESPAN_TOLERANCE))
    notes = [
        f"non-uniform: {len(tasks_of)} logical workers; {search.downgraded} downgrade(s) from "
        f"{classes[-1]} MiB kept the predicted makespan within {MAKESPAN_TOLERANCE:.1%} "
        f"of {baseline:.3f}s and saved at least {MIN_GB_S_SAVING:.0%} of the predicted GB-s",
        *_over_largest(search.floor, classes[-1]),
        *search.notes(),
    ]
    goal = options.goal()
    after = Prediction(search.timing.makespan_s, search.timing.gb_s)
    before = Prediction(uniform.timing.makespan_s, uniform.timing.gb_s)
    if search.downgraded and not goal.better(after, before):
        notes.append(
            f"non-uniform: downgrades not kept: {goal.versus(after, before)} of uniform, "
            f"no better for {goal.describe()}"
        )
        search.memory, search.timing = dict(uniform.memory), uniform.timing
    return Choice(
        "non-uniform",
        search.memory,
        uniform.worker_of,
        search.timing,
        notes,
        simulations=search.simulations,
    )


@dataclass
class _Downgrades:
    """The non-uniform search: the classes chosen so far (``memory``), their predicted
    schedule, and what was tried."""

    shared: SharedEstimates
    options: PlanningOptions
    classes: list[int]  # ascending
    worker_of: dict[str, str | None]
    tasks_of: dict[str, list[str]]  # logical worker -> its tasks
    floor: dict[str, int]
    memory: dict[str, int]
    timing: Timing
    max_simulations: int | None = None
    lateness: float = 0.0  # the slack a downgraded worker keeps, a share of the makespan
    simulations: int = 0
    downgraded: int = 0
    considered: int = 0
    rejected: list[str] = field(default_factory=list)  # why the last round's were not kept

    def run(self, limit: float) -> None:
        """Rounds of downgrades until no candidate is left or a whole round is rejected."""
        while self.max_simulations is None or self.simulations < self.max_simulations:
            candidates = self._candidates()
            if not candidates:
                return
            candidates.sort(reverse=True)
            self.considered += len(candidates)
            if not self._round(candidates, limit):
                return

    def _candidates(self) -> list[tuple[float, str, int]]:
        """(GB-seconds weight, logical worker, next smaller class) of every worker off the
        critical path whose tasks have the slack for the next smaller class above their
        floors."""
        timing = self.timing
        critical = set(timing.critical_path)
        slack = _slack(self.shared.dag, timing)
        candidates = []
        for logical, tasks in self.tasks_of.items():
            current = self.memory[tasks[0]]
            floor = max(self.floor[t] for t in tasks)
            smaller = [c for c in self.classes if c < current and c >= floor]
            if not smaller or critical.intersection(tasks):
                continue
            target = smaller[-1]
            after, before = self.shared.exec_at(target), self.shared.exec_at(current)
            added = sum(after[t] - before[t] for t in tasks)
            if added <= min(slack[t] for t in tasks):
                weight = sum(timing.tasks[t].complete_s - timing.tasks[t].start_s for t in tasks)
                candidates.append((weight * current, logical, target))
        return candidates

    def _round(self, candidates: list[tuple[float, str, int]], limit: float) -> bool:
        """Try the round's downgrades, halving it until one is kept; False if none is.

        Halving assumes fewer downgrades cost less time. Where ``STALE_HALVINGS`` halvings in a
        row each take less than ``HALVING_PROGRESS`` off the predicted time over ``limit``, the
        round stops: what costs the time is not how many workers are downgraded (RNA-seq-1000,
        945 tasks on 4 workers: a smaller class starts cold, so one downgraded worker was
        predicted as late as 389 of them; halving down to one took 9 schedules, about half of
        the planning time)."""
        closest = math.inf  # the lowest makespan over the limit this round
        stale = 0
        while candidates and (
            self.max_simulations is None or self.simulations < self.max_simulations
        ):
            self.simulations += 1
            trial = dict(self.memory)
            for _, logical, target in candidates:
                for task_id in self.tasks_of[logical]:
                    trial[task_id] = target
            trial_timing = simulate_plan(self.shared, trial, self.worker_of, self.options)
            # Kept only if it is no slower and cheaper: where limits are enforced, a smaller
            # class starts slower and runs CPU-bound work slower, which can cost GB-seconds.
            if trial_timing.makespan_s > limit:
                self.rejected = [
                    f"predicted makespan {trial_timing.makespan_s:.3f}s > {limit:.3f}s"
                ]
                # progress: a tenth of the excess gone (a halving that cuts the added time
                # in proportion takes half of it)
                excess = trial_timing.makespan_s - limit
                if excess > (1 - HALVING_PROGRESS) * (closest - limit):
                    stale += 1
                else:
                    stale = 0
                closest = min(closest, trial_timing.makespan_s)
                if stale >= STALE_HALVINGS:
                    self.rejected.append(
                        f"{STALE_HALVINGS} halvings of the round in a row took less than "
                        f"{HALVING_PROGRESS:.0%} off the time over {limit:.3f}s"
                    )
                    return False
            elif trial_timing.gb_s > self.timing.gb_s * (1 - MIN_GB_S_SAVING):
                self.rejected = [
                    f"predicted GB-s {trial_timing.gb_s:.3f} vs {self.timing.gb_s:.3f}: less "
                    f"than {MIN_GB_S_SAVING:.0%} saved"
                ]
            elif tight := self._tight(candidates, trial_timing):
                self.rejected = [
                    f"{len(tight)} downgraded worker(s) left with less slack than the "
                    f"{self.lateness:.0%} of the makespan that runs came out late by"
                ]
                candidates = [c for c in candidates if c[1] not in tight]
                continue
            else:
                self.memory, self.timing = trial, trial_timing
                self.downgraded += len(candidates)
                self.rejected = []
                return True
            candidates = candidates[: len(candidates) // 2]
        return False

    def _tight(self, candidates: list[tuple[float, str, int]], timing: Timing) -> set[str]:
        """The downgraded logical workers with a task that, in the trial schedule ``timing``,
        ends less than ``lateness`` of the makespan before it would delay the run."""
        if self.lateness <= 0:
            return set()
        slack = _slack(self.shared.dag, timing)
        margin = self.lateness * timing.makespan_s
        return {
            logical
            for _, logical, _ in candidates
            if min(slack[t] for t in self.tasks_of[logical]) < margin
        }

    def notes(self) -> list[str]:
        """Why nothing was downgraded, and how many tasks their predicted peak held up."""
        notes = []
        if self.max_simulations is not None and self.simulations >= self.max_simulations:
            notes.append(
                f"non-uniform: downgrade search stopped after {self.simulations} trial "
                "schedule(s) to stay within the planning budget"
            )
        if not self.downgraded:
            notes.append(
                "non-uniform: no smaller class pays off here: "
                + (
                    f"{self.considered} downgrade(s) tried, the last rejected "
                    f"({'; '.join(self.rejected)})"
                    if self.rejected
                    else "no worker off the critical path has the slack for a smaller class"
                )
            )
        smallest = self.classes[0]
        hinted = {t for t, spec in self.shared.dag.tasks.items() if spec.min_memory_mib}
        held = sum(1 for t, f in self.floor.items() if f > smallest and t not in hinted)
        if held:
            notes.append(f"predicted peak memory kept {held} task(s) above {smallest} MiB")
        return notes


def _slack(dag: DagSpec, timing: Timing) -> dict[str, float]:
    """Per task: how much later it could complete without delaying the run (DAG edges only)."""
    latest: dict[str, float] = {}
    for task_id in reversed(list(dag.tasks)):
        spec = dag.tasks[task_id]
        if spec.downstream:
            latest[task_id] = min(
                latest[d] - (timing.tasks[d].complete_s - timing.tasks[d].start_s)
                for d in spec.downstream
            )
        else:
            latest[task_id] = timing.makespan_s
    return {t: max(0.0, latest[t] - timing.tasks[t].complete_s) for t in dag.tasks}
