"""The report's charts: Plotly figures (plain dicts of ``data`` and ``layout``), each with
the sentence that goes above it. The numbers come from :mod:`dagkube.report.numbers`; names
users chose (workflows, task ids) go through :func:`plotly_text` before Plotly shows them."""

from __future__ import annotations

import html
import statistics
from collections import defaultdict

from dagkube.metrics.aggregation import START_KINDS
from dagkube.metrics.history import RunHistory
from dagkube.report.numbers import (
    MIN_MEASURED_S,
    Arms,
    PlannerRow,
    counts_per_planner,
    deltas,
    error_series,
    makespans_by_sla,
    median,
    planner_rows,
    prewarm_leads,
    with_and_without,
    within_prediction,
    worker_starts,
)

Section = tuple[str, dict]  # the text above a chart, and the chart


def plotly_text(name: str) -> str:
    """A user's name (workflow, task id) as Plotly shows it: Plotly reads labels as a subset
    of HTML (``<br>``, ``<a href>``), so ``<``, ``>`` and ``&`` are escaped to read as
    themselves. Quotes stay: Plotly decodes ``&lt;`` but not ``&quot;``."""
    return html.escape(name, quote=False)


def figure(data: list[dict], layout: dict) -> dict:
    """A Plotly figure with the report's margins and height (``layout`` may override)."""
    return {"data": data, "layout": {"margin": {"t": 40, "b": 60}, "height": 420, **layout}}


def _axis(letter: str, number: int) -> str:
    """Plotly's name of the n-th x or y axis of a grid: x, x2, x3…"""
    return letter if number == 1 else f"{letter}{number}"


# ---------------------------------------------------------------------------- planners


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
    return figure(
        data,
        {
            "barmode": "group",
            "title": f"Medians per planner (seconds, GB-s); % against {baseline}",
        },
    )


def planner_sections(histories: list[RunHistory]) -> list[Section]:
    """Planners compared within a workflow, against wukong where it ran: the workflows with
    the most runs first, at most four, each with at least two planners."""
    by_workflow: dict[str, list[RunHistory]] = defaultdict(list)
    for history in histories:
        by_workflow[history.run.workflow].append(history)
    found = []
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
        chart = planners_figure(rows, baseline)
        chart["layout"]["title"] = f"{plotly_text(workflow)}: {chart['layout']['title']}"
        found.append((f"{workflow}, against {baseline}: {text}", chart))
    return found


# ---------------------------------------------------------------------------- optimizations


def _arms_text(arms: Arms) -> str:
    return "; ".join(
        f"{workflow}: "
        + ", ".join(
            f"{arm} median {median(values) or 0:.3f}s, mean {statistics.fmean(values):.3f}s "
            f"({len(values)} tasks)"
            for arm, values in by_arm.items()
        )
        for workflow, by_arm in arms.items()
    )


def _arms_figure(arms: Arms, title: str) -> dict:
    return figure(
        [
            {"type": "box", "name": f"{plotly_text(workflow)}: {arm}", "y": values, "boxmean": True}
            for workflow, by_arm in arms.items()
            for arm, values in by_arm.items()
        ],
        {"title": title},
    )


def _preload_sections(histories: list[RunHistory]) -> list[Section]:
    """The tasks pre-load served, with and without it: their input-wait, and their start
    after the run's submission."""
    compared = [
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
    return [
        (f"Pre-load, {what}: {_arms_text(arms)}", _arms_figure(arms, title))
        for what, arms, title in compared
        if arms
    ]


def _prewarm_sections(histories: list[RunHistory]) -> list[Section]:
    leads = prewarm_leads(histories)
    if not leads:
        return []
    return [
        (
            f"Pre-warm: {len(leads)} targets started a median {median(leads) or 0:.2f}s "
            "after their request fell due",
            figure(
                [{"type": "histogram", "x": leads, "name": "target start - trigger"}],
                {"title": "Target task start minus pre-warm trigger time (s)"},
            ),
        )
    ]


def _start_sections(histories: list[RunHistory]) -> list[Section]:
    starts = worker_starts(histories)
    if not starts:
        return []
    planners = sorted(starts)
    data = [
        {"type": "bar", "name": kind, "x": planners, "y": [starts[p][kind] for p in planners]}
        for kind in START_KINDS
    ]
    return [
        (
            "Worker starts per planner: cold, warm, pre-warmed",
            figure(data, {"barmode": "stack", "title": "Worker starts"}),
        )
    ]


def _taskdup_sections(histories: list[RunHistory]) -> list[Section]:
    waits = with_and_without(
        histories,
        "taskdup",
        lambda t: bool(t.duplicated),
        lambda h, t: t.blocked_s + t.input_wait_s,
    )
    if not waits:
        return []
    return [
        (
            "Task duplication, the wait of the consumers whose late upstream it re-ran "
            f"(blocked + input-wait): {_arms_text(waits)}",
            _arms_figure(waits, "Consumers' wait for their inputs (s)"),
        )
    ]


def _count_sections(histories: list[RunHistory]) -> list[Section]:
    counts = counts_per_planner(histories)
    if not counts:
        return []
    names = sorted({name for runs in counts.values() for c in runs for name in c})
    planners = sorted(counts)
    data = [
        {
            "type": "bar",
            "name": name,
            "x": planners,
            "y": [median(c.get(name, 0) for c in counts[p]) for p in planners],
        }
        for name in names
    ]
    return [
        (
            "Median count of each optimization per run",
            figure(data, {"barmode": "group", "title": "Tasks marked per run (median)"}),
        )
    ]


def optimization_figures(histories: list[RunHistory]) -> list[Section]:
    """Each optimization's effect where the history can show it, then how often each ran."""
    return [
        *_preload_sections(histories),
        *_prewarm_sections(histories),
        *_start_sections(histories),
        *_taskdup_sections(histories),
        *_count_sections(histories),
    ]


# ---------------------------------------------------------------------------- accuracy, SLA


def _accuracy_text(series: dict[str, list[float]], avg_sla: dict[str, list[float]]) -> str:
    def summary(found: dict[str, list[float]]) -> str:
        return ", ".join(
            f"{metric} median {median(values) or 0:.1f}% ({len(values)} runs)"
            for metric, values in found.items()
            if values
        )

    text = f"Relative prediction error by run (oldest first): {summary(series)}."
    if avg_sla["makespan"] and len(avg_sla["makespan"]) < len(series["makespan"]):
        text += (
            f" Runs planned at SLA avg only: {summary(avg_sla)} (a pNN plan predicts each part "
            "at that percentile of its samples, so it overshoots a typical run on purpose)."
        )
    return (
        f"{text} Execution, transfer (downloads + uploads), start-up (invocation queued "
        "until a worker takes it) and output size (bytes every task produced) are each run's "
        "totals against its plan's; a run that measured under "
        f"{MIN_MEASURED_S * 1000:.0f} ms of a part is left out of that line."
    )


def accuracy_figure(histories: list[RunHistory]) -> Section | None:
    """One panel per metric: each run's relative prediction error, oldest run first."""
    errors = error_series(histories)
    series = errors.by_run
    if not series["makespan"][1]:
        return None
    text = _accuracy_text({m: ys for m, (_, ys) in series.items()}, errors.avg_sla)
    data = [
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
    ]
    titles = [
        {
            "text": metric,
            "showarrow": False,
            "xref": _axis("x", number) + " domain",
            "yref": _axis("y", number) + " domain",
            "x": 0.5,
            "y": 1.08,
        }
        for number, metric in enumerate(series, start=1)
    ]
    return text, figure(
        data,
        {
            "title": "|predicted - actual| / actual (%) by run, one panel per metric",
            "grid": {"rows": (len(series) + 1) // 2, "columns": 2, "pattern": "independent"},
            "height": 310 * ((len(series) + 1) // 2),
            "annotations": titles,
        },
    )


def sla_figure(histories: list[RunHistory]) -> Section | None:
    by_sla = makespans_by_sla(histories)
    if not by_sla:
        return None
    shares = {sla: within_prediction(pairs) for sla, pairs in by_sla.items()}
    text = "; ".join(
        f"{sla}: {shares[sla]:.0%} of {len(pairs)} runs within prediction"
        for sla, pairs in sorted(by_sla.items())
    )
    return (
        text,
        figure(
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
