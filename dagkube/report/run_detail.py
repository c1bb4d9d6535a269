"""The figures of one run in detail: its DAG with the planned and the actual critical path,
where each task's time went, each task's predicted and actual execution time and output
size, and its memory per task."""

from __future__ import annotations

from dagkube.metrics.history import RunHistory
from dagkube.planning.model import Plan
from dagkube.report.figures import Section, figure, plotly_text
from dagkube.report.numbers import (
    MIB,
    critical_path,
    dag_positions,
    limits_text,
    median,
    memory_lines,
    mib_text,
    task_predictions,
    time_parts,
)
from dagkube.store.records import TaskRecord


def _memory_hover(task: TaskRecord) -> str:
    """A chart tooltip (Plotly's HTML subset): the task id, escaped, over its memory lines."""
    return "<br>".join([plotly_text(task.task_id), *memory_lines(task)])


def _path_markers(label: str, ids: list[str], position: dict, color: str) -> dict:
    """Rings around the tasks of a critical path."""
    return {
        "type": "scatter",
        "mode": "markers",
        "name": label,
        "x": [position[t][0] for t in ids],
        "y": [position[t][1] for t in ids],
        "marker": {"size": 20, "color": "rgba(0,0,0,0)", "line": {"width": 2, "color": color}},
        "hoverinfo": "skip",
    }


def _dag_figure(history: RunHistory, actual_path: list[str]) -> dict:
    """The DAG by level, a trace per worker, and rings for the planned and the actual
    critical path."""
    plan = Plan.model_validate_json(history.plan_json) if history.plan_json else None
    planned_path = {t for t, p in plan.tasks.items() if p.critical_path} if plan else set()
    position = dag_positions(history.edges)
    records = {t.task_id: t for t in history.tasks}
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
    for worker in sorted({t.logical_worker or t.worker_id for t in history.tasks}):
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
        data.append(_path_markers(label, [t for t in position if t in path], position, color))
    return figure(
        data,
        {
            "title": "DAG by level, colored by worker",
            "xaxis": {"title": "level"},
            "yaxis": {"visible": False},
        },
    )


def _breakdown_figure(ordered: list[TaskRecord], parts: dict[str, list[float]]) -> dict:
    return figure(
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


def run_figures(history: RunHistory) -> list[Section]:
    """One run: its DAG with both critical paths, the time breakdown of its tasks, and their
    memory when measured."""
    actual_path = critical_path(history)
    ordered, parts = time_parts(history)
    run = history.run
    text = (
        f"Run {run.run_id} ({run.workflow}, {run.planner}, SLA "
        f"{run.sla}): makespan {run.makespan_s or 0:.2f}s, predicted "
        f"{run.predicted_makespan_s or 0:.2f}s; actual critical path "
        f"{' → '.join(actual_path) or 'unknown'}; {limits_text(run)}"
    )
    return [
        (text, _dag_figure(history, actual_path)),
        ("Time breakdown per task", _breakdown_figure(ordered, parts)),
        *([predicted] if (predicted := prediction_figure(history)) else []),
        *([memory] if (memory := memory_figure(ordered)) else []),
    ]


def prediction_figure(history: RunHistory) -> Section | None:
    """Per task, predicted against actual execution time (left) and output size (right, KiB:
    the bytes its output edges carried); None without a stored plan."""
    found = task_predictions(history)
    if not found:
        return None
    exec_error = median(p.exec_error for p in found)
    output_error = median(p.output_error for p in found)
    text = "Per task, predicted vs actual: execution median error " + (
        "-" if exec_error is None else f"{exec_error:.1%}"
    )
    text += ", output size median error " + (
        "- (the plan predates output-size predictions)"
        if output_error is None
        else f"{output_error:.1%}"
    )
    names = [plotly_text(p.task_id) for p in found]
    bars = [
        ("predicted execution", [p.predicted_exec_s for p in found], "x", "#9ecae1"),
        ("actual execution", [p.exec_s for p in found], "x", "#08519c"),
        (
            "predicted output",
            [
                None if p.predicted_output_bytes is None else p.predicted_output_bytes / 1024
                for p in found
            ],
            "x2",
            "#fdae6b",
        ),
        ("actual output", [p.output_bytes / 1024 for p in found], "x2", "#a63603"),
    ]
    return text + f" ({len(found)} tasks)", figure(
        [
            {
                "type": "bar",
                "orientation": "h",
                "name": name,
                "y": names,
                "x": values,
                "xaxis": axis,
                "marker": {"color": color},
            }
            for name, values, axis, color in bars
        ],
        {
            "barmode": "group",
            "title": "Predicted vs actual per task: execution (s) and output size (KiB)",
            "xaxis": {"domain": [0, 0.48], "title": "execution (s)"},
            "xaxis2": {"domain": [0.52, 1], "title": "output (KiB)"},
            "height": max(420, 28 * len(found)),
        },
    )


def memory_figure(tasks: list[TaskRecord]) -> Section | None:
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
    return text, figure(
        data,
        {
            "barmode": "group",
            "title": "Memory per task (MiB): class, peak, OOM-killed attempts",
            "height": max(420, 24 * len(tasks)),
        },
    )
