"""The planners: ``wukong``, ``uniform`` and ``non-uniform`` (DESIGN "Planners").

Every planner returns a validated :class:`Plan` carrying the timing model's predictions
(start/end per task, critical path, makespan, GB-seconds) and how much history backed them.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.history import HistorySnapshot
from dagkube.planning.model import (
    OPTIMIZATIONS,
    Optimization,
    Plan,
    TaskPlan,
    WorkerPlan,
    output_must_be_stored,
)
from dagkube.planning.optimizations import (
    RuleInput,
    check_conflicts,
    check_optimizations,
    mark,
    mark_prewarm,
)
from dagkube.planning.predictions import Predictor, statistic
from dagkube.planning.timing import Timing, estimate, simulate
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB, parse_classes

DEFAULT_CLUSTER_SIZE = 4
DEFAULT_IDLE_TIMEOUT_S = 30.0  # how long an idle worker waits for work before it exits
MAKESPAN_TOLERANCE = 0.005  # non-uniform: a downgrade may not grow the makespan beyond this
MIN_GB_S_SAVING = 0.01  # non-uniform: ... and must save at least this share of the GB-seconds


@dataclass
class PlanningOptions:
    """Everything a planner may use besides the DAG."""

    classes_mib: list[int]
    sla: str = "avg"
    history: HistorySnapshot = field(default_factory=HistorySnapshot)
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB
    max_cpu: float = DEFAULT_MAX_CPU
    max_workers: int | None = None  # local worker cap; None on Kubernetes
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    warm_pool: dict[int, int] = field(default_factory=dict)  # idle workers per class now
    startup_delay_s: float = 0.0
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    cpu_enforced: bool = True  # False for local workers, which share the machine's cores
    optimizations: list[str] = field(default_factory=list)  # in OPTIMIZATIONS order
    label: str | None = None  # the planner's name as asked for, e.g. "uniform-opt"

    @classmethod
    def for_run(
        cls,
        classes: str | Iterable[str | int] | None = None,
        *,
        sla: str = "avg",
        history: HistorySnapshot | None = None,
        memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
        max_cpu: float = DEFAULT_MAX_CPU,
        max_workers: int | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        startup_delay_s: float = 0.0,
        cpu_enforced: bool = True,
        optimizations: Iterable[str] | str | None = None,
        warm_pool: dict[int, int] | None = None,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
    ) -> PlanningOptions:
        """The options of one planning call, as every caller (library, runtime, command line,
        operator) builds them: ``classes`` parsed (None: the default classes),
        ``optimizations`` checked and put in composition order, no history or warm pool unless
        given. Callers pass only what their setting decides; the defaults live here."""
        return cls(
            classes_mib=parse_classes(classes),
            sla=sla,
            history=history if history is not None else HistorySnapshot(),
            memory_per_cpu_mib=memory_per_cpu_mib,
            max_cpu=max_cpu,
            max_workers=max_workers,
            idle_timeout_s=idle_timeout_s,
            warm_pool=dict(warm_pool or {}),
            startup_delay_s=startup_delay_s,
            cluster_size=cluster_size,
            cpu_enforced=cpu_enforced,
            optimizations=check_optimizations(optimizations),
        )

    def predictor(self) -> Predictor:
        return Predictor(
            self.history,
            self.sla,
            self.memory_per_cpu_mib,
            self.max_cpu,
            startup_delay_s=self.startup_delay_s,
            cpu_enforced=self.cpu_enforced,
        )


def default_class(classes_mib: list[int]) -> int:
    """The class a single-class planner uses: the middle one (the lower middle for even counts)."""
    ordered = sorted(classes_mib)
    return ordered[(len(ordered) - 1) // 2]


def memory_floors(
    dag: DagSpec, predictor: Predictor, input_bytes: dict[str, int]
) -> dict[str, int]:
    """Per task, the least memory its class must have: its ``min_memory`` hint, and its
    predicted peak plus headroom (or more than a class it was OOM-killed at)."""
    floors: dict[str, int] = {}
    for task_id, spec in dag.tasks.items():
        predicted = predictor.memory_floor_mib(spec.function, input_bytes[task_id], task_id)
        floors[task_id] = max(spec.min_memory_mib or 0, predicted)
    return floors


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


def _floors_at(dag: DagSpec, predictor: Predictor, memory_mib: int) -> dict[str, int]:
    sizes = estimate(dag, predictor, dict.fromkeys(dag.tasks, memory_mib))
    return memory_floors(dag, predictor, sizes.input_bytes)


def _timing(
    dag: DagSpec,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    options: PlanningOptions,
    marks: dict[str, list[Optimization]] | None = None,
) -> Timing:
    return simulate(
        dag,
        memory,
        worker_of,
        predictor,
        max_workers=options.max_workers,
        idle_timeout_s=options.idle_timeout_s,
        warm_pool=options.warm_pool,
        optimizations=marks,
    )


def _optimize(
    dag: DagSpec,
    options: PlanningOptions,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    timing: Timing,
    notes: list[str],
) -> tuple[dict[str, list[Optimization]], Timing]:
    """Apply the switched-on optimization rules (docs/architecture.md) and re-predict."""
    names = list(options.optimizations)
    if not names:
        return {}, timing
    if "taskdup" in names and options.history.empty:
        names.remove("taskdup")  # lateness is judged against predictions: defaults would guess
        notes.append("taskdup: off until the workflow has history to predict lateness from")
    given = RuleInput(dag, memory, worker_of, predictor, estimate(dag, predictor, memory), timing)
    marks = mark(names, given)
    if marks:
        timing = given.timing = _timing(dag, memory, worker_of, predictor, options, marks)
    if "prewarm" in names:
        trial = {t: list(entries) for t, entries in marks.items()}
        requested = mark_prewarm(given, trial)
        if not requested:
            notes.append("prewarm: no cold start is predicted after the run begins")
        else:
            trial_timing = _timing(dag, memory, worker_of, predictor, options, trial)
            used = sum(1 for a in trial_timing.activities if a.prewarmed)
            if not used:
                notes.append("prewarm: no pre-warmed worker would be ready in time; none asked")
            elif trial_timing.makespan_s > timing.makespan_s * (1 + MAKESPAN_TOLERANCE):
                notes.append("prewarm: requests would lengthen the predicted makespan; none made")
            else:
                marks, timing = trial, trial_timing
                notes.append(
                    f"prewarm: {requested} worker(s) requested ahead of demand, {used} predicted "
                    "to be used"
                )
    counts = {name: 0 for name in names}
    for entries in marks.values():
        for entry in entries:
            counts[entry.name] += 1
    notes.append(
        "optimizations: "
        + ", ".join(f"{name} on {count} task(s)" for name, count in counts.items())
    )
    return marks, timing


def _build(
    dag: DagSpec,
    planner: str,
    options: PlanningOptions,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    timing: Timing,
    notes: list[str],
) -> Plan:
    planner = options.label or planner
    marks, timing = _optimize(dag, options, memory, worker_of, predictor, timing, notes)
    critical = set(timing.critical_path)
    calibration = _calibration(planner, options, predictor)
    if calibration:
        notes.append(
            f"makespan calibrated by {calibration:+.3f}s from this planner's earlier runs "
            f"(SLA {options.sla} of actual minus model)"
        )
    if options.history.empty:
        notes.append("no history for this workflow: predictions use documented defaults")
    elif predictor.used_defaults:
        notes.append("defaults used for: " + ", ".join(sorted(predictor.used_defaults)))
    tasks = {
        task_id: _task_plan(task_id, memory, worker_of, timing, task_id in critical, marks)
        for task_id in dag.tasks
    }
    return Plan(
        planner=planner,
        sla=options.sla,
        classes_mib=sorted(options.classes_mib),
        memory_per_cpu_mib=options.memory_per_cpu_mib,
        max_cpu=options.max_cpu,
        tasks=tasks,
        workers=[
            WorkerPlan(
                logical_id=a.logical_id,
                memory_mib=a.memory_mib,
                cold=a.cold,
                prewarmed=a.prewarmed,
                predicted_start_s=round(a.start_s, 6),
                predicted_end_s=round(a.end_s, 6),
                tasks=len(a.tasks),
                predicted_startup_s=round(a.ready_s - a.queued_s, 6),
            )
            for a in timing.activities
        ],
        predicted_makespan_s=round(max(timing.makespan_s + calibration, 0.0), 6),
        model_makespan_s=round(timing.makespan_s, 6),
        predicted_gb_s=round(timing.gb_s, 6),
        history_runs=options.history.runs,
        history_samples=predictor.sample_count,
        optimizations=list(options.optimizations),
        notes=notes,
    )


def _task_plan(
    task_id: str,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    timing: Timing,
    critical: bool,
    marks: dict[str, list[Optimization]],
) -> TaskPlan:
    predicted = timing.tasks[task_id]
    return TaskPlan(
        memory_mib=memory[task_id],
        worker_id=worker_of[task_id],
        predicted_start_s=round(predicted.start_s, 6),
        predicted_end_s=round(predicted.complete_s, 6),
        predicted_download_s=round(predicted.download_s, 6),
        predicted_exec_s=round(predicted.end_s - predicted.exec_start_s, 6),
        predicted_upload_s=round(predicted.upload_s, 6),
        critical_path=critical,
        optimizations=marks.get(task_id, []),
    )


CALIBRATION_RUNS = 3


def _calibration(planner: str, options: PlanningOptions, predictor: Predictor) -> float:
    """What the timing model cannot see (per-run scheduling costs, jitter) shows up as the
    difference between earlier actual and modelled makespans of this planner: add its SLA
    statistic (mean for avg, the percentile for pNN). Residuals are measured against the
    model's own prediction, so calibration never feeds back on itself."""
    residuals = [r for name, r in options.history.residuals if name == planner]
    if len(residuals) < CALIBRATION_RUNS:
        return 0.0
    return statistic(residuals, predictor.percentile)


# ---------------------------------------------------------------------- wukong
def plan_wukong(dag: DagSpec, options: PlanningOptions) -> Plan:
    """One class (the middle one), every task on a flexible worker."""
    predictor = options.predictor()
    middle = default_class(options.classes_mib)
    floors = _floors_at(dag, predictor, middle)
    memory, fit_notes = _fit_floors(dag, options.classes_mib, middle, floors)
    notes = [f"wukong: every task on a flexible worker of class {memory} MiB", *fit_notes]
    per_task = dict.fromkeys(dag.tasks, memory)
    flexible: dict[str, str | None] = dict.fromkeys(dag.tasks)
    timing = _timing(dag, per_task, flexible, predictor, options)
    return _build(dag, "wukong", options, per_task, flexible, predictor, timing, notes)


# ---------------------------------------------------------------------- uniform
def assign_workers(
    dag: DagSpec,
    exec_s: dict[str, float],
    out_bytes: dict[str, int],
    cluster_size: int,
    transfer_s: Callable[[int], float],
    preload: bool = False,
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
        leader = max(children, key=lambda c: bottom[c])
        worker_of[leader] = parent_worker or new_worker()
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

    place_group(dag.sources, None)
    for task_id, spec in dag.tasks.items():
        if task_id not in worker_of:  # a fan-in: placed when all its inputs are placed
            placed: dict[str | None, int] = {}
            for dep in spec.deps:
                owner = worker_of[dep]
                placed[owner] = placed.get(owner, 0) + out_bytes[dep]
            total = sum(placed.values())
            best = max(placed, key=lambda w: placed[w])
            on_path = worker_of[max(spec.deps, key=lambda d: finish[d])]
            extra = transfer_s(total - placed[on_path]) - transfer_s(total - placed[best])
            keep_path = preload or extra <= max(0.01, 0.1 * exec_s[task_id])
            worker_of[task_id] = on_path if keep_path else best
        finish[task_id] = max((finish[d] for d in spec.deps), default=0.0) + exec_s[task_id]
        single_input = [d for d in spec.downstream if len(dag.tasks[d].deps) == 1]
        if single_input:
            place_group(single_input, worker_of[task_id])
    return worker_of


def _uniform_assignment(
    dag: DagSpec, options: PlanningOptions, predictor: Predictor, memory_mib: int
):
    memory = dict.fromkeys(dag.tasks, memory_mib)
    sizes = estimate(dag, predictor, memory)
    worker_of = assign_workers(
        dag,
        sizes.exec_s,
        sizes.out_bytes,
        options.cluster_size,
        predictor.transfer_s,
        preload="preload" in options.optimizations,
    )
    return memory, worker_of, sizes.input_bytes


def plan_uniform(dag: DagSpec, options: PlanningOptions) -> Plan:
    """One class (the largest given), logical workers assigned from predictions."""
    predictor = options.predictor()
    memory_mib = max(options.classes_mib)  # no floor can raise the largest class
    memory, worker_of, input_bytes = _uniform_assignment(dag, options, predictor, memory_mib)
    floors = memory_floors(dag, predictor, input_bytes)
    _, fit_notes = _fit_floors(dag, options.classes_mib, memory_mib, floors)
    timing = _timing(dag, memory, worker_of, predictor, options)
    workers = len(set(worker_of.values()))
    notes = [f"uniform: {workers} logical workers of class {memory_mib} MiB", *fit_notes]
    return _build(dag, "uniform", options, memory, worker_of, predictor, timing, notes)


# ---------------------------------------------------------------------- non-uniform
def plan_non_uniform(dag: DagSpec, options: PlanningOptions) -> Plan:
    """Start every worker on the largest class, then downgrade workers off the critical path
    one class at a time while the predicted makespan does not grow, and never below a task's
    memory floor (its ``min_memory`` hint, its predicted peak plus headroom).

    Candidates are chosen from the slack of their tasks (latest minus earliest finish in the
    predicted schedule), largest GB-seconds first, so one full simulation checks a whole
    round of downgrades; a round that grows the makespan is halved until it does not.
    """
    classes = sorted(options.classes_mib)
    predictor = options.predictor()
    memory, worker_of, input_bytes = _uniform_assignment(dag, options, predictor, classes[-1])
    floor = memory_floors(dag, predictor, input_bytes)
    timing = _timing(dag, memory, worker_of, predictor, options)
    baseline = timing.makespan_s
    limit = baseline * (1 + MAKESPAN_TOLERANCE)
    tasks_of: dict[str, list[str]] = {}
    for task_id, logical in worker_of.items():
        tasks_of.setdefault(str(logical), []).append(task_id)
    downgraded = 0
    considered = 0
    rejected: list[str] = []  # why the last round's downgrades were not kept
    while True:
        critical = set(timing.critical_path)
        slack = _slack(dag, timing)
        candidates = []
        for logical, tasks in tasks_of.items():
            current = memory[tasks[0]]
            smaller = [c for c in classes if c < current and c >= max(floor[t] for t in tasks)]
            if not smaller or critical.intersection(tasks):
                continue
            target = smaller[-1]
            added = sum(
                predictor.exec_s(dag.tasks[t].function, input_bytes[t], target, t)
                - predictor.exec_s(dag.tasks[t].function, input_bytes[t], current, t)
                for t in tasks
            )
            if added <= min(slack[t] for t in tasks):
                weight = sum(timing.tasks[t].complete_s - timing.tasks[t].start_s for t in tasks)
                candidates.append((weight * current, logical, target))
        if not candidates:
            break
        candidates.sort(reverse=True)
        considered += len(candidates)
        accepted = False
        while candidates:
            trial = dict(memory)
            for _, logical, target in candidates:
                for task_id in tasks_of[logical]:
                    trial[task_id] = target
            trial_timing = _timing(dag, trial, worker_of, predictor, options)
            # Kept only if it is no slower and cheaper: where limits are enforced, a smaller
            # class starts slower and runs CPU-bound work slower, which can cost GB-seconds.
            if trial_timing.makespan_s > limit:
                rejected = [f"predicted makespan {trial_timing.makespan_s:.3f}s > {limit:.3f}s"]
            elif trial_timing.gb_s > timing.gb_s * (1 - MIN_GB_S_SAVING):
                rejected = [
                    f"predicted GB-s {trial_timing.gb_s:.3f} vs {timing.gb_s:.3f}: less than "
                    f"{MIN_GB_S_SAVING:.0%} saved"
                ]
            else:
                memory, timing = trial, trial_timing
                downgraded += len(candidates)
                accepted = True
                rejected = []
                break
            candidates = candidates[: len(candidates) // 2]
        if not accepted:
            break
    notes = [
        f"non-uniform: {len(tasks_of)} logical workers; {downgraded} downgrade(s) from "
        f"{classes[-1]} MiB kept the predicted makespan within {MAKESPAN_TOLERANCE:.1%} "
        f"of {baseline:.3f}s and saved at least {MIN_GB_S_SAVING:.0%} of the predicted GB-s",
        *_over_largest(floor, classes[-1]),
    ]
    if not downgraded:
        notes.append(
            "non-uniform: no smaller class pays off here: "
            + (
                f"{considered} downgrade(s) tried, the last rejected ({rejected[0]})"
                if rejected
                else "no worker off the critical path has the slack for a smaller class"
            )
        )
    held = sum(1 for t, f in floor.items() if f > classes[0] and not dag.tasks[t].min_memory_mib)
    if held:
        notes.append(f"predicted peak memory kept {held} task(s) above {classes[0]} MiB")
    return _build(dag, "non-uniform", options, memory, worker_of, predictor, timing, notes)


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


# ---------------------------------------------------------------------- validation
def validate_plan(dag: DagSpec, plan: Plan) -> None:
    """Reject a plan the runtime could not execute, naming the task and the problem."""
    classes = set(plan.classes_mib)
    missing = [t for t in dag.tasks if t not in plan.tasks]
    if missing:
        raise InvalidOption(f"Plan has no entry for task {missing[0]!r} ({len(missing)} missing)")
    worker_class: dict[str, tuple[int, str]] = {}
    for task_id, task in plan.tasks.items():
        if task_id not in dag.tasks:
            raise InvalidOption(f"Plan names task {task_id!r}, which the workflow does not have")
        if task.memory_mib not in classes:
            raise InvalidOption(
                f"Task {task_id!r}: class {task.memory_mib} MiB is not one of the configured "
                f"classes {sorted(classes)}"
            )
        hint = dag.tasks[task_id].min_memory_mib
        if hint and task.memory_mib < hint:
            raise InvalidOption(
                f"Task {task_id!r}: class {task.memory_mib} MiB is below its min_memory {hint} MiB"
            )
        if task.worker_id is not None:
            seen = worker_class.setdefault(task.worker_id, (task.memory_mib, task_id))
            if seen[0] != task.memory_mib:
                raise InvalidOption(
                    f"Worker {task.worker_id!r} has two classes: {seen[0]} MiB (task "
                    f"{seen[1]!r}) and {task.memory_mib} MiB (task {task_id!r})"
                )
    _validate_optimizations(dag, plan)


def _validate_optimizations(dag: DagSpec, plan: Plan) -> None:
    """Every mark names a known, switched-on optimization and real tasks; no two conflict."""
    marks = {t: task.optimizations for t, task in plan.tasks.items() if task.optimizations}
    for task_id, entries in marks.items():
        for entry in entries:
            if entry.name not in OPTIMIZATIONS:
                raise InvalidOption(
                    f"Task {task_id!r}: optimization {entry.name!r} is unknown: choose from "
                    f"{', '.join(OPTIMIZATIONS)}"
                )
            if entry.name not in plan.optimizations:
                raise InvalidOption(
                    f"Task {task_id!r}: optimization {entry.name!r} is not switched on for "
                    f"this plan ({', '.join(plan.optimizations) or 'none are'})"
                )
            named = [entry.params.get(k) for k in ("upstream", "fan_in")]
            named += list(entry.params.get("inputs", [])) + list(entry.params.get("children", []))
            for other in named:
                if other is not None and other not in dag.tasks:
                    raise InvalidOption(
                        f"Task {task_id!r}: {entry.name} names task {other!r}, which the "
                        "workflow does not have"
                    )
            if entry.name == "prewarm" and entry.params.get("memory_mib") not in plan.classes_mib:
                raise InvalidOption(
                    f"Task {task_id!r}: prewarm asks for class {entry.params.get('memory_mib')} "
                    f"MiB, not one of the configured classes {plan.classes_mib}"
                )

    def stored(task_id: str) -> bool:
        clustered = any(o.name == "clustering" for o in marks.get(task_id, ()))
        return output_must_be_stored(dag, task_id, lambda t: plan.tasks[t].worker_id, clustered)

    check_conflicts(dag, marks, stored)
