"""``dagkube report``: one self-contained HTML file (Plotly, its JavaScript embedded, so it
opens offline) built from the run history in Redis. It answers the questions the seed notes
ask: do the planners save resources and at what makespan cost, do the optimizations help, how
accurate are the predictions over time, what do stricter SLAs buy, how does one run spend its
time. The numbers are computed by small pure functions over the history records; the HTML is
assembled at the end.
"""

from __future__ import annotations

import html
import json
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from dagkube.metrics.history import RunHistory, read_run, run_ids
from dagkube.metrics.records import RunRecord, TaskRecord
from dagkube.planning.model import Plan

SECTIONS = {
    "planners": "Planners side by side",
    "optimizations": "Optimization impact",
    "accuracy": "Prediction accuracy over time",
    "sla": "SLA impact",
    "run": "One run in detail",
}
EXPERIMENT_HINT = (
    "dagkube experiment FILE.py --planners wukong,uniform,uniform-opt,non-uniform,"
    "non-uniform-opt --slas avg,p90,p95,p99 --repeat 5"
)


def _median(values: Iterable[float]) -> float | None:
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
    groups: dict[str, list[RunHistory]] = defaultdict(list)
    for history in histories:
        if history.run.status == "succeeded" and history.run.makespan_s is not None:
            groups[history.run.planner_label].append(history)
    rows = []
    for planner, found in sorted(groups.items()):
        rows.append(
            PlannerRow(
                planner,
                len(found),
                _median(h.run.makespan_s or 0.0 for h in found) or 0.0,
                _median(execution_s(h) for h in found) or 0.0,
                _median(charged_gb_s(h) for h in found) or 0.0,
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


ACCURACY_METRICS = ("makespan", "execution", "transfer", "start-up")
MIN_MEASURED_S = 0.005  # below this a relative error is noise: the run is left out
MIB = 1024 * 1024


def _relative_error(predicted: float | None, actual: float | None) -> float | None:
    if predicted is None or actual is None or actual < MIN_MEASURED_S:
        return None
    return abs(predicted - actual) / actual


def prediction_errors(history: RunHistory) -> dict[str, float | None]:
    """Relative errors of one run against its plan: the makespan, and the run's totals of task
    execution, transfer (downloads + uploads) and worker start-up (invocation queued -> taken).
    None where the plan predicted no such part (plans from before these were stored) or the
    run measured less than MIN_MEASURED_S of it."""
    run = history.run
    errors: dict[str, float | None] = dict.fromkeys(ACCURACY_METRICS)
    errors["makespan"] = _relative_error(run.predicted_makespan_s, run.makespan_s)
    if not history.plan_json:
        return errors
    plan = Plan.model_validate_json(history.plan_json)
    matched = [(plan.tasks[t.task_id], t) for t in history.tasks if t.task_id in plan.tasks]
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
    startups = [w.startup_s for w in history.workers if not w.resumed and w.startup_s is not None]
    if plan.workers and all(w.predicted_startup_s is not None for w in plan.workers):
        errors["start-up"] = _relative_error(
            sum(w.predicted_startup_s or 0.0 for w in plan.workers), sum(startups)
        )
    return errors


def optimization_counts(history: RunHistory) -> dict[str, int]:
    if not history.plan_json:
        return {}
    return dict(Plan.model_validate_json(history.plan_json).optimization_counts())


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


def plotly_text(name: str) -> str:
    """A user's name (workflow, task id) as Plotly shows it: Plotly reads labels as a subset
    of HTML (``<br>``, ``<a href>``), so ``<``, ``>`` and ``&`` are escaped to read as
    themselves. Quotes stay: Plotly decodes ``&lt;`` but not ``&quot;``."""
    return html.escape(name, quote=False)


_SCRIPT_JSON_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` block: no string in it can
    close the block (``</script>``), open a comment (``<!--``) or end a JavaScript line
    (U+2028/U+2029). These characters only occur inside JSON strings, where the ``\\uXXXX``
    escapes decode to the same text."""
    return json.dumps(value).translate(_SCRIPT_JSON_ESCAPES)


def _memory_hover(task: TaskRecord) -> str:
    """A chart tooltip (Plotly's HTML subset): the task id, escaped, over its memory lines."""
    return "<br>".join([plotly_text(task.task_id), *memory_lines(task)])


def limits_text(run: RunRecord) -> str:
    """Whether the run's workers were held to their class, and its OOM kills if any."""
    text = f"memory and CPU limits {'enforced' if run.enforced else 'not enforced'}"
    if run.oom_kills or run.escalations:
        text += f", {run.oom_kills} worker(s) OOM-killed, {run.escalations} re-run one class up"
    return text


def levels(edges: dict[str, list[str]]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def level(task_id: str) -> int:
        if task_id not in depth:
            depth[task_id] = 1 + max((level(u) for u in edges.get(task_id, [])), default=-1)
        return depth[task_id]

    for task_id in edges:
        level(task_id)
    return depth


# ---------------------------------------------------------------------------- figures


def _figure(data: list[dict], layout: dict) -> dict:
    return {"data": data, "layout": {"margin": {"t": 40, "b": 60}, "height": 420, **layout}}


def planners_figure(rows: list[PlannerRow], baseline: str) -> dict:
    changes = deltas(rows, baseline)
    names = {
        "makespan_s": "makespan",
        "execution_s": "execution time",
        "gb_s": "GB-seconds (incl. unused workers)",
    }
    data = []
    for metric, label in names.items():
        data.append(
            {
                "type": "bar",
                "name": label,
                "x": [r.planner for r in rows],
                "y": [getattr(r, metric) for r in rows],
                "text": [
                    "baseline" if r.planner == baseline else f"{changes[r.planner][metric]:+.0f}%"
                    for r in rows
                ],
                "textposition": "outside",
            }
        )
    return _figure(
        data,
        {
            "barmode": "group",
            "title": f"Medians per planner (seconds, GB-s); % against {baseline}",
        },
    )


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
            if history.run.workflow != workflow or history.run.status != "succeeded":
                continue
            on = optimization in history.run.optimizations
            arms[f"with {optimization}" if on else f"without {optimization}"] += [
                value(history, t) for t in history.tasks if t.task_id in ids and not t.duplicate
            ]
        if all(arms.values()):
            found[workflow] = arms
    return found


def _arms_text(arms: Arms) -> str:
    return "; ".join(
        f"{workflow}: "
        + ", ".join(
            f"{arm} median {_median(values) or 0:.3f}s, mean {statistics.fmean(values):.3f}s "
            f"({len(values)} tasks)"
            for arm, values in by_arm.items()
        )
        for workflow, by_arm in arms.items()
    )


def _arms_figure(arms: Arms, title: str) -> dict:
    return _figure(
        [
            {"type": "box", "name": f"{plotly_text(workflow)}: {arm}", "y": values, "boxmean": True}
            for workflow, by_arm in arms.items()
            for arm, values in by_arm.items()
        ],
        {"title": title},
    )


def optimization_figures(histories: list[RunHistory]) -> list[tuple[str, dict]]:
    figures: list[tuple[str, dict]] = []
    preloaded = [
        (
            "input-wait",
            with_and_without(
                histories, "preload", lambda t: bool(t.preloaded), lambda h, t: t.input_wait_s
            ),
            "Input-wait of the tasks pre-load served (s)",
        ),
        (
            "execution start after the run's submission",
            with_and_without(
                histories,
                "preload",
                lambda t: bool(t.preloaded),
                lambda h, t: t.started_at - h.run.submitted_at,
            ),
            "Execution start of the tasks pre-load served, after submission (s)",
        ),
    ]
    for what, arms, title in preloaded:
        if arms:
            figures.append((f"Pre-load, {what}: {_arms_text(arms)}", _arms_figure(arms, title)))
    leads = []
    for history in histories:
        started = {t.task_id: t.started_at for t in history.tasks}
        for task in history.tasks:
            for target in task.prewarm_targets:
                if task.prewarm_at and target in started:
                    leads.append(started[target] - task.prewarm_at)
    if leads:
        figures.append(
            (
                f"Pre-warm: {len(leads)} targets started a median {_median(leads) or 0:.2f}s "
                "after their request fell due",
                _figure(
                    [{"type": "histogram", "x": leads, "name": "target start - trigger"}],
                    {"title": "Target task start minus pre-warm trigger time (s)"},
                ),
            )
        )
    starts: dict[str, dict[str, int]] = defaultdict(lambda: {"cold": 0, "warm": 0, "prewarmed": 0})
    for history in histories:
        for worker in history.workers:
            if worker.outcome == "lost":
                continue
            kind = "prewarmed" if worker.prewarmed else "cold" if worker.cold else "warm"
            starts[history.run.planner_label][kind] += 1
    if starts:
        planners = sorted(starts)
        figures.append(
            (
                "Worker starts per planner: cold, warm, pre-warmed",
                _figure(
                    [
                        {
                            "type": "bar",
                            "name": kind,
                            "x": planners,
                            "y": [starts[p][kind] for p in planners],
                        }
                        for kind in ("cold", "warm", "prewarmed")
                    ],
                    {"barmode": "stack", "title": "Worker starts"},
                ),
            )
        )
    waits = with_and_without(
        histories,
        "taskdup",
        lambda t: bool(t.duplicated),
        lambda h, t: t.blocked_s + t.input_wait_s,
    )
    if waits:
        figures.append(
            (
                "Task duplication, the wait of the consumers whose late upstream it re-ran "
                f"(blocked + input-wait): {_arms_text(waits)}",
                _arms_figure(waits, "Consumers' wait for their inputs (s)"),
            )
        )
    counts: dict[str, list[dict[str, int]]] = defaultdict(list)
    for history in histories:
        if history.run.optimizations:
            counts[history.run.planner_label].append(optimization_counts(history))
    if counts:
        names = sorted({name for runs in counts.values() for c in runs for name in c})
        figures.append(
            (
                "Median count of each optimization per run",
                _figure(
                    [
                        {
                            "type": "bar",
                            "name": name,
                            "x": sorted(counts),
                            "y": [
                                _median(c.get(name, 0) for c in counts[p]) for p in sorted(counts)
                            ],
                        }
                        for name in names
                    ],
                    {"barmode": "group", "title": "Tasks marked per run (median)"},
                ),
            )
        )
    return figures


def _axis(letter: str, number: int) -> str:
    """Plotly's name of the n-th x or y axis of a grid: x, x2, x3…"""
    return letter if number == 1 else f"{letter}{number}"


def accuracy_figure(histories: list[RunHistory]) -> tuple[str, dict] | None:
    ordered = sorted(histories, key=lambda h: h.run.submitted_at)
    series: dict[str, tuple[list[int], list[float]]] = {m: ([], []) for m in ACCURACY_METRICS}
    mean_sla: dict[str, list[float]] = {m: [] for m in ACCURACY_METRICS}
    for index, history in enumerate(ordered):
        for metric, value in prediction_errors(history).items():
            if value is not None:
                series[metric][0].append(index + 1)
                series[metric][1].append(value * 100)
                if history.run.sla == "avg":
                    mean_sla[metric].append(value * 100)
    if not series["makespan"][1]:
        return None

    def summary(found: dict[str, list[float]]) -> str:
        return ", ".join(
            f"{metric} median {_median(values) or 0:.1f}% ({len(values)} runs)"
            for metric, values in found.items()
            if values
        )

    text = (
        "Relative prediction error by run (oldest first): "
        f"{summary({m: ys for m, (_, ys) in series.items()})}."
    )
    if mean_sla["makespan"] and len(mean_sla["makespan"]) < len(series["makespan"][1]):
        text += (
            f" Runs planned at SLA avg only: {summary(mean_sla)} (a pNN plan predicts each part "
            "at that percentile of its samples, so it overshoots a typical run on purpose)."
        )
    return (
        f"{text} Execution, transfer (downloads + uploads) and start-up (invocation queued "
        "until a worker takes it) are each run's totals against its plan's; a run that "
        f"measured under {MIN_MEASURED_S * 1000:.0f} ms of a part is left out of that line.",
        _figure(
            [
                {
                    "type": "scatter",
                    "mode": "lines+markers",
                    "name": metric,
                    "x": xs,
                    "y": ys,
                    "xaxis": _axis("x", number),
                    "yaxis": _axis("y", number),
                }
                for number, (metric, (xs, ys)) in enumerate(series.items(), start=1)
            ],
            {
                "title": "|predicted - actual| / actual (%) by run, one panel per metric",
                "grid": {"rows": 2, "columns": 2, "pattern": "independent"},
                "height": 620,
                "annotations": [
                    {
                        "text": metric,
                        "showarrow": False,
                        "xref": _axis("x", number) + " domain",
                        "yref": _axis("y", number) + " domain",
                        "x": 0.5,
                        "y": 1.08,
                    }
                    for number, metric in enumerate(series, start=1)
                ],
            },
        ),
    )


def sla_figure(histories: list[RunHistory]) -> tuple[str, dict] | None:
    by_sla: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for history in histories:
        run = history.run
        if run.status == "succeeded" and run.makespan_s and run.predicted_makespan_s:
            by_sla[run.sla].append((run.predicted_makespan_s, run.makespan_s))
    if not by_sla:
        return None
    shares = {
        sla: sum(1 for predicted, actual in pairs if actual <= predicted) / len(pairs)
        for sla, pairs in by_sla.items()
    }
    text = "; ".join(
        f"{sla}: {shares[sla]:.0%} of {len(pairs)} runs within prediction"
        for sla, pairs in sorted(by_sla.items())
    )
    return (
        text,
        _figure(
            [
                {
                    "type": "scatter",
                    "mode": "markers",
                    "name": f"{sla} ({shares[sla]:.0%} within)",
                    "x": [p for p, _ in pairs],
                    "y": [a for _, a in pairs],
                }
                for sla, pairs in sorted(by_sla.items())
            ],
            {
                "title": "Measured vs predicted makespan (s): below the diagonal = within",
                "xaxis": {"title": "predicted"},
                "yaxis": {"title": "measured"},
            },
        ),
    )


def run_figures(history: RunHistory) -> list[tuple[str, dict]]:
    plan = Plan.model_validate_json(history.plan_json) if history.plan_json else None
    planned_path = {t for t, p in plan.tasks.items() if p.critical_path} if plan else set()
    actual_path = critical_path(history)
    depth = levels(history.edges)
    records = {t.task_id: t for t in history.tasks}
    workers = sorted({t.logical_worker or t.worker_id for t in history.tasks})
    rows: dict[int, int] = defaultdict(int)
    position = {}
    for task_id in sorted(depth, key=lambda t: (depth[t], t)):
        position[task_id] = (depth[task_id], rows[depth[task_id]])
        rows[depth[task_id]] += 1
    edge_x: list[float | None] = []
    edge_y: list[float | None] = []
    for task_id, upstream in history.edges.items():
        for up in upstream:
            if up in position and task_id in position:
                edge_x += [position[up][0], position[task_id][0], None]
                edge_y += [position[up][1], position[task_id][1], None]
    data: list[dict] = [
        {
            "type": "scatter",
            "mode": "lines",
            "x": edge_x,
            "y": edge_y,
            "name": "edges",
            "line": {"color": "#bbb"},
            "hoverinfo": "skip",
        }
    ]
    for worker in workers:
        ids = [
            t
            for t in position
            if t in records and (records[t].logical_worker or records[t].worker_id) == worker
        ]
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": worker[-12:],
                "x": [position[t][0] for t in ids],
                "y": [position[t][1] for t in ids],
                "text": [_memory_hover(records[t]) for t in ids],
                "marker": {"size": 12},
            }
        )
    for label, path, color in (
        ("planned critical path", planned_path, "#d62728"),
        ("actual critical path", set(actual_path), "#111"),
    ):
        ids = [t for t in position if t in path]
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": label,
                "x": [position[t][0] for t in ids],
                "y": [position[t][1] for t in ids],
                "marker": {
                    "size": 20,
                    "color": "rgba(0,0,0,0)",
                    "line": {"width": 2, "color": color},
                },
                "hoverinfo": "skip",
            }
        )
    dag = _figure(
        data,
        {
            "title": "DAG by level, colored by worker",
            "xaxis": {"title": "level"},
            "yaxis": {"visible": False},
        },
    )
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
    breakdown = _figure(
        [
            {
                "type": "bar",
                "orientation": "h",
                "name": name,
                "y": [plotly_text(t.task_id) for t in ordered],
                "x": values,
            }
            for name, values in parts.items()
        ],
        {
            "barmode": "stack",
            "title": "Time per task (s): when it became ready, then its parts",
            "height": max(420, 18 * len(ordered)),
        },
    )
    text = (
        f"Run {history.run.run_id} ({history.run.workflow}, {history.run.planner}, SLA "
        f"{history.run.sla}): makespan {history.run.makespan_s or 0:.2f}s, predicted "
        f"{history.run.predicted_makespan_s or 0:.2f}s; actual critical path "
        f"{' → '.join(actual_path) or 'unknown'}; {limits_text(history.run)}"
    )
    return [
        (text, dag),
        ("Time breakdown per task", breakdown),
        *([memory] if (memory := memory_figure(ordered)) else []),
    ]


def memory_figure(tasks: list[TaskRecord]) -> tuple[str, dict] | None:
    """Per task its class, its peak and its OOM-killed attempts (MiB); None when no task
    carries a measurement (runs from before peaks were recorded)."""
    if not any(t.peak_memory_bytes is not None or t.oom_attempts for t in tasks):
        return None
    text = "Memory per task: class and peak"
    measured = [t for t in tasks if t.peak_memory_bytes is not None]
    if measured:
        top = max(measured, key=lambda t: t.peak_memory_bytes or 0)
        text += (
            f"; highest peak {mib_text(top.peak_memory_bytes)} ({top.task_id}, class "
            f"{top.memory_mib} MiB)"
        )
    killed = [f"{t.task_id} {'; '.join(memory_lines(t)[1:])}" for t in tasks if t.oom_attempts]
    if killed:
        text += "; " + "; ".join(killed)
    attempts = [(t.task_id, a) for t in tasks for a in t.oom_attempts]
    hover = [_memory_hover(t) for t in tasks]
    data: list[dict] = [
        {
            "type": "bar",
            "orientation": "h",
            "name": "class",
            "y": [plotly_text(t.task_id) for t in tasks],
            "x": [t.memory_mib for t in tasks],
            "hovertext": hover,
        },
        {
            "type": "bar",
            "orientation": "h",
            "name": "peak",
            "y": [plotly_text(t.task_id) for t in tasks],
            "x": [
                None if t.peak_memory_bytes is None else t.peak_memory_bytes / MIB for t in tasks
            ],
            "hovertext": hover,
        },
    ]
    if attempts:
        data.append(
            {
                "type": "scatter",
                "mode": "markers",
                "name": "OOM-killed attempt (its class)",
                "y": [plotly_text(task_id) for task_id, _ in attempts],
                "x": [a.memory_mib for _, a in attempts],
                "marker": {"symbol": "x", "size": 12, "color": "#d62728"},
            }
        )
    return text, _figure(
        data,
        {
            "barmode": "group",
            "title": "Memory per task (MiB): class, peak, OOM-killed attempts",
            "height": max(420, 24 * len(tasks)),
        },
    )


# ---------------------------------------------------------------------------- assembly


async def load_histories(
    redis: Any, *, workflow: str | None, since: float | None, limit: int
) -> list[RunHistory]:
    found = []
    for run_id in await run_ids(redis, workflow=workflow, limit=limit):
        history = await read_run(redis, run_id)
        if history is None or (since is not None and history.run.submitted_at < since):
            continue
        found.append(history)
    return found


def render(
    histories: list[RunHistory], *, run_id: str | None = None, title: str = "dagkube report"
) -> str:
    """The HTML document (plotly.js embedded once)."""
    from plotly.offline import get_plotlyjs

    sections: dict[str, list[tuple[str, dict | None]]] = {key: [] for key in SECTIONS}
    if histories:
        by_workflow: dict[str, list[RunHistory]] = defaultdict(list)
        for history in histories:
            by_workflow[history.run.workflow].append(history)
        # Planners are compared within a workflow; the workflows with the most runs first.
        for workflow, runs in sorted(by_workflow.items(), key=lambda item: -len(item[1]))[:4]:
            rows = planner_rows(runs)
            if len(rows) < 2:
                continue
            baseline = "wukong" if any(r.planner == "wukong" for r in rows) else rows[0].planner
            changes = deltas(rows, baseline)
            text = "; ".join(
                f"{r.planner}: makespan {changes[r.planner]['makespan_s']:+.0f}%, execution "
                f"{changes[r.planner]['execution_s']:+.0f}%, GB-s "
                f"{changes[r.planner]['gb_s']:+.0f}%"
                for r in rows
                if r.planner != baseline
            )
            figure = planners_figure(rows, baseline)
            figure["layout"]["title"] = f"{plotly_text(workflow)}: {figure['layout']['title']}"
            sections["planners"].append((f"{workflow}, against {baseline}: {text}", figure))
        sections["optimizations"] = list(optimization_figures(histories))
        accuracy = accuracy_figure(histories)
        if accuracy:
            sections["accuracy"].append(accuracy)
        sla = sla_figure(histories)
        if sla:
            sections["sla"].append(sla)
        chosen = (
            [h for h in histories if h.run.run_id == run_id]
            if run_id
            else [h for h in histories if h.run.status == "succeeded" and h.edges]
        )
        if chosen:
            sections["run"] = list(run_figures(max(chosen, key=lambda h: h.run.submitted_at)))
    figures: list[tuple[str, dict]] = []
    body = [f"<h1>{html.escape(title)}</h1>"]
    if not histories:
        body.append(
            '<p class="empty" id="no-history">No runs in the history yet (or none match the '
            f"filters). Run some first, e.g. <code>{html.escape(EXPERIMENT_HINT)}</code>.</p>"
        )
    else:
        body.append(f"<p>{len(histories)} runs from the history.</p>")
        for key, heading in SECTIONS.items():
            body.append(f'<section id="{key}"><h2>{html.escape(heading)}</h2>')
            if not sections[key]:
                body.append(
                    '<p class="empty">No runs with the data this section needs. Fill it with '
                    f"<code>{html.escape(EXPERIMENT_HINT)}</code>.</p>"
                )
            for text, chart in sections[key]:
                body.append(f"<p>{html.escape(text)}</p>")
                if chart is not None:
                    body.append(f'<div class="chart" id="chart-{len(figures)}"></div>')
                    figures.append((text, chart))
            body.append("</section>")
    script = "\n".join(
        f"Plotly.newPlot('chart-{i}', {script_json(f['data'])}, {script_json(f['layout'])}, "
        "{responsive: true, displaylogo: false});"
        for i, (_, f) in enumerate(figures)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
section{{margin-top:2.5em}} .empty{{color:#777}} code{{background:#f3f3f3;padding:0 .3em}}</style>
<script>window.dagkubeErrors=[];window.addEventListener('error',function(e){{
window.dagkubeErrors.push(String(e.message));}});</script>
<script>{get_plotlyjs()}</script></head>
<body data-charts="{len(figures)}">
{"".join(body)}
<script>
try {{
{script}
}} catch (e) {{ window.dagkubeErrors.push(String(e)); }}
document.body.setAttribute('data-rendered', document.querySelectorAll('.js-plotly-plot').length);
document.body.setAttribute('data-errors', JSON.stringify(window.dagkubeErrors));
</script>
</body></html>
"""
