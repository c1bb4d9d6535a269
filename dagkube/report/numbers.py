"""What the report computes from the run history: medians per planner, prediction errors,
critical paths, with/without comparisons, and the plain-text wording of sizes and limits.
Pure functions over the history records, no HTML and no plotting, so each number can be
checked on records built by hand."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dagkube.metrics.aggregation import START_KINDS, start_kind
from dagkube.metrics.history import RunHistory
from dagkube.planning.model import Plan
from dagkube.store.records import RunRecord, RunStatus, TaskRecord

ACCURACY_METRICS = ("makespan", "execution", "transfer", "start-up", "output size")
MIN_MEASURED_S = 0.005  # below this a relative error is noise: the run is left out
MIB = 1024 * 1024


def median(values: Iterable[float | None]) -> float | None:
    """The median of the values that are there; None when there are none."""
    found = [v for v in values if v is not None]
    return statistics.median(found) if found else None


def execution_s(history: RunHistory) -> float:
    return sum(t.ended_at - t.started_at for t in history.tasks)


def charged_gb_s(history: RunHistory) -> float:
    """Everything the run was charged: its workers' GB-s plus those created for it that never
    served (unused pre-warms, workers another worker beat to their invocation)."""
    run = history.run
    return run.gb_s + run.prewarm_wasted_gb_s + run.workers_unused_gb_s


@dataclass
class PlannerRow:
    planner: str
    runs: int
    makespan_s: float
    execution_s: float
    gb_s: float


def planner_rows(histories: list[RunHistory]) -> list[PlannerRow]:
    """Per planner (by name), the medians of its succeeded runs."""
    groups: dict[str, list[RunHistory]] = defaultdict(list)
    for history in histories:
        if history.run.status == RunStatus.SUCCEEDED and history.run.makespan_s is not None:
            groups[history.run.planner_label].append(history)
    rows = []
    for planner, found in sorted(groups.items()):
        rows.append(
            PlannerRow(
                planner,
                len(found),
                median(h.run.makespan_s or 0.0 for h in found) or 0.0,
                median(execution_s(h) for h in found) or 0.0,
                median(charged_gb_s(h) for h in found) or 0.0,
            )
        )
    return rows


def deltas(rows: list[PlannerRow], baseline: str) -> dict[str, dict[str, float]]:
    """Per planner, each metric as a % change against the baseline planner's."""
    base = next(r for r in rows if r.planner == baseline)
    found = {}
    for row in rows:
        found[row.planner] = {
            metric: (getattr(row, metric) / getattr(base, metric) - 1) * 100
            if getattr(base, metric)
            else 0.0
            for metric in ("makespan_s", "execution_s", "gb_s")
        }
    return found


def _relative_error(predicted: float | None, actual: float | None) -> float | None:
    if predicted is None or actual is None or actual < MIN_MEASURED_S:
        return None
    return abs(predicted - actual) / actual


def prediction_errors(history: RunHistory) -> dict[str, float | None]:
    """Relative errors of one run against its plan: the makespan, and the run's totals of task
    execution, transfer (each task's one fetch of the inputs it did not hold, plus its
    output's upload, as the worker measures them), worker start-up (invocation queued ->
    taken) and output size (bytes of every task's output); duplicates (taskdup) left out.
    None where the plan predicted no such part (plans from before these were stored) or the
    run measured less than MIN_MEASURED_S of it (no output byte, for sizes)."""
    run = history.run
    errors: dict[str, float | None] = dict.fromkeys(ACCURACY_METRICS)
    errors["makespan"] = _relative_error(run.predicted_makespan_s, run.makespan_s)
    if not history.plan_json:
        return errors
    plan = Plan.model_validate_json(history.plan_json)
    # A duplicate (taskdup) is a second execution the plan did not predict: the task's own
    # prediction is compared with its original execution only.
    matched = [
        (plan.tasks[t.task_id], t)
        for t in history.tasks
        if t.task_id in plan.tasks and not t.duplicate
    ]
    if matched and all(p.predicted_exec_s is not None for p, _ in matched):
        errors["execution"] = _relative_error(
            sum(p.predicted_exec_s or 0.0 for p, _ in matched),
            sum(t.ended_at - t.started_at for _, t in matched),
        )
        errors["transfer"] = _relative_error(
            sum(
                (p.predicted_download_s or 0.0) + (p.predicted_upload_s or 0.0) for p, _ in matched
            ),
            sum(t.download_s + t.upload_s for _, t in matched),
        )
    if matched and all(p.predicted_output_bytes is not None for p, _ in matched):
        produced = sum(t.output_bytes for _, t in matched)
        if produced:
            predicted = sum(p.predicted_output_bytes or 0 for p, _ in matched)
            errors["output size"] = abs(predicted - produced) / produced
    startups = [w.startup_s for w in history.workers if not w.resumed and w.startup_s is not None]
    if plan.workers and all(w.predicted_startup_s is not None for w in plan.workers):
        errors["start-up"] = _relative_error(
            sum(w.predicted_startup_s or 0.0 for w in plan.workers), sum(startups)
        )
    return errors


@dataclass
class TaskPrediction:
    """One task of a run against its plan: execution time and output size."""

    task_id: str
    predicted_exec_s: float | None
    exec_s: float
    predicted_output_bytes: int | None
    output_bytes: int

    @property
    def exec_error(self) -> float | None:
        return _relative_error(self.predicted_exec_s, self.exec_s)

    @property
    def output_error(self) -> float | None:
        if self.predicted_output_bytes is None or not self.output_bytes:
            return None
        return abs(self.predicted_output_bytes - self.output_bytes) / self.output_bytes


def task_predictions(history: RunHistory) -> list[TaskPrediction]:
    """Per task of the run (by start), what its plan predicted and what it measured; empty
    without a stored plan."""
    if not history.plan_json:
        return []
    plan = Plan.model_validate_json(history.plan_json)
    return [
        TaskPrediction(
            t.task_id,
            plan.tasks[t.task_id].predicted_exec_s,
            t.ended_at - t.started_at,
            plan.tasks[t.task_id].predicted_output_bytes,
            t.output_bytes,
        )
        for t in sorted(history.tasks, key=lambda t: t.started_at)
        if t.task_id in plan.tasks
    ]


@dataclass
class ErrorSeries:
    """Relative prediction errors (%) per metric over the runs, oldest first."""

    by_run: dict[str, tuple[list[int], list[float]]]  # metric -> (run numbers from 1, errors)
    avg_sla: dict[str, list[float]]  # metric -> errors of the runs planned at SLA avg


def error_series(histories: list[RunHistory]) -> ErrorSeries:
    ordered = sorted(histories, key=lambda h: h.run.submitted_at)
    series = ErrorSeries({m: ([], []) for m in ACCURACY_METRICS}, {m: [] for m in ACCURACY_METRICS})
    for index, history in enumerate(ordered):
        for metric, value in prediction_errors(history).items():
            if value is not None:
                series.by_run[metric][0].append(index + 1)
                series.by_run[metric][1].append(value * 100)
                if history.run.sla == "avg":
                    series.avg_sla[metric].append(value * 100)
    return series


def makespans_by_sla(histories: list[RunHistory]) -> dict[str, list[tuple[float, float]]]:
    """Per SLA, (predicted, measured) makespan of each succeeded run that has both."""
    by_sla: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for history in histories:
        run = history.run
        if run.status == RunStatus.SUCCEEDED and run.makespan_s and run.predicted_makespan_s:
            by_sla[run.sla].append((run.predicted_makespan_s, run.makespan_s))
    return by_sla


def within_prediction(pairs: list[tuple[float, float]]) -> float:
    """The share of (predicted, measured) makespans that finished within the prediction."""
    return sum(1 for predicted, actual in pairs if actual <= predicted) / len(pairs)


def optimization_counts(history: RunHistory) -> dict[str, int]:
    if not history.plan_json:
        return {}
    return dict(Plan.model_validate_json(history.plan_json).optimization_counts())


def counts_per_planner(histories: list[RunHistory]) -> dict[str, list[dict[str, int]]]:
    """Per planner, the optimization counts of each run that switched some on."""
    counts: dict[str, list[dict[str, int]]] = defaultdict(list)
    for history in histories:
        if history.run.optimizations:
            counts[history.run.planner_label].append(optimization_counts(history))
    return counts


def prewarm_leads(histories: list[RunHistory]) -> list[float]:
    """For each pre-warm target that started, its start minus the time its request fell due
    (negative: it started before)."""
    leads = []
    for history in histories:
        started = {t.task_id: t.started_at for t in history.tasks}
        for task in history.tasks:
            for target in task.prewarm_targets:
                if task.prewarm_at and target in started:
                    leads.append(started[target] - task.prewarm_at)
    return leads


def worker_starts(histories: list[RunHistory]) -> dict[str, dict[str, int]]:
    """Per planner, the workers that served (not lost) by start kind."""
    starts: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(START_KINDS, 0))
    for history in histories:
        for worker in history.workers:
            if worker.outcome == "lost":
                continue
            starts[history.run.planner_label][start_kind(worker)] += 1
    return starts


Arms = dict[str, dict[str, list[float]]]  # workflow -> "with X" / "without X" -> values


def with_and_without(
    histories: list[RunHistory],
    optimization: str,
    served: Callable[[TaskRecord], bool],
    value: Callable[[RunHistory, TaskRecord], float],
) -> Arms:
    """Per workflow where ``optimization`` served some task (``served``): ``value`` of those
    task ids in the succeeded runs that switched it on and in those that did not. Only
    workflows with both arms are kept: a comparison needs the same tasks on both sides."""
    task_ids: dict[str, set[str]] = defaultdict(set)
    for history in histories:
        for task in history.tasks:
            if served(task):
                task_ids[history.run.workflow].add(task.task_id)
    found: Arms = {}
    for workflow, ids in sorted(task_ids.items()):
        arms: dict[str, list[float]] = {f"without {optimization}": [], f"with {optimization}": []}
        for history in histories:
            if history.run.workflow != workflow or history.run.status != RunStatus.SUCCEEDED:
                continue
            on = optimization in history.run.optimizations
            arms[f"with {optimization}" if on else f"without {optimization}"] += [
                value(history, t) for t in history.tasks if t.task_id in ids and not t.duplicate
            ]
        if all(arms.values()):
            found[workflow] = arms
    return found


def critical_path(history: RunHistory) -> list[str]:
    """The actual critical path: from the last task to end, back through the upstream that
    ended last."""
    ended = {t.task_id: t.ended_at for t in history.tasks}
    if not ended or not history.edges:
        return []
    current = max(ended, key=lambda task_id: ended[task_id])
    path = [current]
    while history.edges.get(current):
        upstream = [u for u in history.edges[current] if u in ended]
        if not upstream:
            break
        current = max(upstream, key=lambda task_id: ended[task_id])
        path.append(current)
    return path[::-1]


def levels(edges: dict[str, list[str]]) -> dict[str, int]:
    """Each task's level in the DAG: 0 for a root, else one more than its deepest upstream."""
    depth: dict[str, int] = {}

    def level(task_id: str) -> int:
        if task_id not in depth:
            depth[task_id] = 1 + max((level(u) for u in edges.get(task_id, [])), default=-1)
        return depth[task_id]

    for task_id in edges:
        level(task_id)
    return depth


def dag_positions(edges: dict[str, list[str]]) -> dict[str, tuple[int, int]]:
    """Where each task is drawn: (its level, its row within the level, by task id)."""
    depth = levels(edges)
    rows: dict[int, int] = defaultdict(int)
    position = {}
    for task_id in sorted(depth, key=lambda t: (depth[t], t)):
        position[task_id] = (depth[task_id], rows[depth[task_id]])
        rows[depth[task_id]] += 1
    return position


def time_parts(history: RunHistory) -> tuple[list[TaskRecord], dict[str, list[float]]]:
    """The run's tasks by start, and per part of their time (the worker's start-up for the
    first task a worker ran, when it became ready after the run's first ready task, input
    wait, execution, upload) one value per task."""
    first = min((t.ready_at for t in history.tasks), default=history.run.submitted_at)
    ordered = sorted(history.tasks, key=lambda t: t.started_at)
    startup = {
        w.logical_worker or w.worker_id: w.startup_s or 0.0
        for w in history.workers
        if w.outcome != "lost"
    }
    parts = {
        "start-up (worker)": [
            startup.get(t.logical_worker or t.worker_id, 0.0)
            if i == 0 or ordered[i - 1].worker_id != t.worker_id
            else 0.0
            for i, t in enumerate(ordered)
        ],
        "invocation (ready)": [max(0.0, t.ready_at - first) for t in ordered],
        "input-wait": [t.input_wait_s for t in ordered],
        "execution": [t.ended_at - t.started_at for t in ordered],
        "upload": [t.upload_s for t in ordered],
    }
    return ordered, parts


def mib_text(size_bytes: int | None) -> str:
    """A measured size as whole MiB (the unit of memory classes); "-" where not measured."""
    return "-" if size_bytes is None else f"{size_bytes / MIB:.0f} MiB"


def memory_lines(task: TaskRecord) -> list[str]:
    """The task's class and peak, then each OOM-killed attempt with the class it re-ran at:
    ``class 1024 MiB, peak 700 MiB``, ``OOM-killed at 256 MiB (peak 262 MiB), re-run at 1024
    MiB``."""
    peak = "not measured" if task.peak_memory_bytes is None else mib_text(task.peak_memory_bytes)
    lines = [f"class {task.memory_mib} MiB, peak {peak}"]
    classes = [a.memory_mib for a in task.oom_attempts] + [task.memory_mib]  # attempt by attempt
    for attempt, rerun_mib in zip(task.oom_attempts, classes[1:], strict=True):
        seen = (
            f" (peak {mib_text(attempt.peak_memory_bytes)})"
            if attempt.peak_memory_bytes is not None
            else ""
        )
        lines.append(f"OOM-killed at {attempt.memory_mib} MiB{seen}, re-run at {rerun_mib} MiB")
    return lines


def limits_text(run: RunRecord) -> str:
    """Whether the run's workers were held to their class, and its OOM kills if any."""
    text = f"memory and CPU limits {'enforced' if run.enforced else 'not enforced'}"
    if run.oom_kills or run.escalations:
        text += f", {run.oom_kills} worker(s) OOM-killed, {run.escalations} re-run one class up"
    return text
