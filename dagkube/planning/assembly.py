"""From a planner's choice (a class and a worker per task) to a :class:`Plan`: the timing
model's schedule with the chosen optimizations, the makespan calibrated from this planner's
earlier runs, the candidates evaluated, and the notes saying what backed the predictions."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from dagkube.dag import DagSpec
from dagkube.planning.estimates import SharedEstimates
from dagkube.planning.fitting import upper_bound
from dagkube.planning.history import calibration_key
from dagkube.planning.model import Alternative, Optimization, Plan, TaskPlan, WorkerPlan
from dagkube.planning.options import PlanningOptions
from dagkube.planning.predictions import Estimates, Predictor, statistic
from dagkube.planning.timing import Timing, simulate

CALIBRATION_RUNS = 3  # earlier runs of a planner needed before its makespan is calibrated
AVG = "avg"


@dataclass
class Choice:
    """What a planner chose before optimizations: a class and a worker per task, the timing
    model's schedule of it, and the notes saying why. ``sizes`` and ``floors`` are kept when
    the planner computed them, so later steps need not predict them again."""

    planner: str  # wukong, uniform or non-uniform
    memory: dict[str, int]
    worker_of: dict[str, str | None]
    timing: Timing
    notes: list[str] = field(default_factory=list)
    sizes: Estimates | None = None  # the predicted sizes and times at ``memory``
    floors: dict[str, int] | None = None  # per task, the least class it may have
    simulations: int = 1  # schedules the timing model simulated to make this choice
    variant: str = ""  # how it differs from the planner's usual choice (e.g. "1024Mi")
    spread: bool = False  # uniform: fan-ins of one upstream spread (planners.assign_workers)
    packed: bool = False  # uniform: tasks whose upload a bound worker hides packed too
    short: bool = False  # uniform: short tasks packed too (planners.SHORT_PACK_SHARE)


def simulate_plan(
    shared: SharedEstimates,
    memory: dict[str, int],
    worker_of: dict[str, str | None],
    options: PlanningOptions,
    marks: dict[str, list[Optimization]] | None = None,
    *,
    longest_first: bool = False,
) -> Timing:
    """The timing model's schedule of a class and worker per task under these options
    (``longest_first``: the sources queued the longest path first)."""
    return simulate(
        shared.dag,
        memory,
        worker_of,
        shared.predictor,
        max_workers=options.max_workers,
        idle_timeout_s=options.idle_timeout_s,
        warm_pool=options.warm_pool,
        optimizations=marks,
        sizes=shared.at(memory),
        longest_first=longest_first,
    )


def build_plan(
    dag: DagSpec,
    options: PlanningOptions,
    choice: Choice,
    predictor: Predictor,
    *,
    marks: dict[str, list[Optimization]],
    timing: Timing,
    optimizations: list[str],
    notes: list[str],
    alternatives: list[Alternative],
) -> Plan:
    """The Plan of a planner's choice with its optimization ``marks`` (switched on:
    ``optimizations``) and their predicted schedule ``timing``; the candidates evaluated on
    the way are ``alternatives``."""
    planner = options.label or choice.planner
    memory, worker_of = choice.memory, choice.worker_of
    notes = list(notes)
    critical = set(timing.critical_path)
    key = calibration_key(planner, choice.planner)
    from_avg = _from_avg_runs(dag, options, choice, marks, key, predictor, timing.longest_first)
    if from_avg is not None:
        predicted_s, note = from_avg
        notes.append(note)
    else:
        calibration = _calibration(key, options, predictor)
        predicted_s = timing.makespan_s + calibration
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
        predicted_makespan_s=round(max(predicted_s, 0.0), 6),
        model_makespan_s=round(timing.makespan_s, 6),
        predicted_gb_s=round(timing.gb_s, 6),
        history_runs=options.history.runs,
        history_samples=predictor.sample_count,
        optimizations=optimizations,
        notes=notes,
        objective=options.objective,
        max_gb_s=options.max_gb_s,
        alternatives=alternatives,
        longest_first=timing.longest_first,
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
        predicted_output_bytes=predicted.output_bytes,
        critical_path=critical,
        optimizations=marks.get(task_id, []),
    )


def _from_avg_runs(
    dag: DagSpec,
    options: PlanningOptions,
    choice: Choice,
    marks: dict[str, list[Optimization]],
    planner: str,
    predictor: Predictor,
    longest_first: bool,
) -> tuple[float, str] | None:
    """A pNN plan's makespan read off the runs planned at SLA avg, while fewer than
    ``CALIBRATION_RUNS`` were planned at its own SLA: this plan's schedule timed with every
    task at its mean, times a pNN bound of those runs' actual / modelled makespans (a ratio:
    when input sizes vary, runs of different lengths miss by different seconds;
    :func:`upper_bound`). A run's makespan then lies under the prediction at least NN % of
    the time (if runs are alike). Adding a residual percentile to a schedule of per-task pNN
    times instead counts the spread twice, and the sum of every task at its pNN is already
    far above the pNN of a sum. None (calibrate as :func:`_calibration` says) at SLA avg, or
    with too few such runs for a bound at NN % (n runs bound the next at most n / (n + 1) of
    the time)."""
    if predictor.percentile is None:
        return None
    mine = [r for r in options.history.residuals if r.planner == planner]
    if sum(r.sla == options.sla for r in mine) >= CALIBRATION_RUNS:
        return None
    at_avg = [r.ratio for r in mine if r.sla == AVG and r.ratio is not None]
    if len(at_avg) / (len(at_avg) + 1) < predictor.percentile / 100:
        return None  # even the largest ratio bounds the next run too rarely: p90 needs 9
    shared = SharedEstimates(dag, replace(options, sla=AVG).predictor(), max(options.classes_mib))
    mean_s = simulate_plan(
        shared, choice.memory, choice.worker_of, options, marks, longest_first=longest_first
    ).makespan_s
    spread = upper_bound(at_avg, predictor.percentile)
    note = (
        f"makespan at {options.sla}: {mean_s:.3f}s (this plan with every task at its mean) "
        f"x {spread:.3f} (a {options.sla} bound of {len(at_avg)} earlier avg runs' actual / "
        "modelled makespan)"
    )
    return mean_s * spread, note


def _calibration(planner: str, options: PlanningOptions, predictor: Predictor) -> float:
    """What the timing model cannot see (per-run scheduling costs, jitter) shows up as the
    difference between earlier actual and modelled makespans of this planner (its
    :func:`calibration_key`: auto's runs count for the planner they chose): add its SLA
    statistic. Residuals are measured against the model's own prediction, so calibration
    never feeds back on itself.

    Runs planned at the same SLA come first: their residuals are what that very model still
    missed. A pNN model already holds the spread of task times, so the pNN of residuals of
    runs planned at another SLA counts some spread twice; it is used only until
    ``CALIBRATION_RUNS`` runs at this SLA exist (erring on the safe side for a percentile).
    """
    mine = [r for r in options.history.residuals if r.planner == planner]
    same = [r.seconds for r in mine if r.sla == options.sla]
    if len(same) >= CALIBRATION_RUNS:
        return statistic(same, predictor.percentile)
    if len(mine) >= CALIBRATION_RUNS:
        return statistic([r.seconds for r in mine], predictor.percentile)
    return 0.0
