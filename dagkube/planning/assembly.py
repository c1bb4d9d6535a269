"""From a planner's choice (a class and a worker per task) to a :class:`Plan`: the timing
model's schedule, the switched-on optimization rules applied to it, the makespan calibrated
from this planner's earlier runs, and the notes saying what backed the predictions."""

from __future__ import annotations

from dagkube.dag import DagSpec
from dagkube.planning.model import Optimization, Plan, TaskPlan, WorkerPlan
from dagkube.planning.optimizations import RuleInput, mark, mark_prewarm
from dagkube.planning.options import PlanningOptions
from dagkube.planning.predictions import Predictor, estimate, statistic
from dagkube.planning.timing import Timing, simulate

MAKESPAN_TOLERANCE = 0.005  # a downgrade or pre-warm may not grow the makespan beyond this
CALIBRATION_RUNS = 3  # earlier runs of a planner needed before its makespan is calibrated


def simulate_plan(
    dag: DagSpec,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    options: PlanningOptions,
    marks: dict[str, list[Optimization]] | None = None,
) -> Timing:
    """The timing model's schedule of a class and worker per task under these options."""
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
        timing = given.timing = simulate_plan(dag, memory, worker_of, predictor, options, marks)
    if "prewarm" in names:
        trial = {t: list(entries) for t, entries in marks.items()}
        requested = mark_prewarm(given, trial)
        if not requested:
            notes.append("prewarm: no cold start is predicted after the run begins")
        else:
            trial_timing = simulate_plan(dag, memory, worker_of, predictor, options, trial)
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


def build_plan(
    dag: DagSpec,
    planner: str,
    options: PlanningOptions,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    predictor: Predictor,
    timing: Timing,
    notes: list[str],
) -> Plan:
    """The Plan of a planner's choice, its optimizations applied and its predictions noted;
    ``timing`` is the schedule of the choice without optimizations."""
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


def _calibration(planner: str, options: PlanningOptions, predictor: Predictor) -> float:
    """What the timing model cannot see (per-run scheduling costs, jitter) shows up as the
    difference between earlier actual and modelled makespans of this planner: add its SLA
    statistic (mean for avg, the percentile for pNN). Residuals are measured against the
    model's own prediction, so calibration never feeds back on itself."""
    residuals = [r for name, r in options.history.residuals if name == planner]
    if len(residuals) < CALIBRATION_RUNS:
        return 0.0
    return statistic(residuals, predictor.percentile)
