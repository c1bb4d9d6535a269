"""The report's HTML page: the histories it is built from, the sections filled with the
figures of :mod:`dagkube.report.figures` and :mod:`dagkube.report.run_detail`, and the
escaping that keeps names users chose as text (in the HTML and in the JSON the page hands to
Plotly)."""

from __future__ import annotations

import html
import json
from typing import Any

from dagkube.metrics.history import RunHistory, read_run, run_ids
from dagkube.report.figures import (
    accuracy_figure,
    optimization_figures,
    planner_sections,
    sla_figure,
)
from dagkube.report.run_detail import run_figures
from dagkube.store.records import RunStatus

SECTIONS = {
    "planners": "Planners side by side",
    "optimizations": "Optimization impact",
    "accuracy": "Prediction accuracy over time",
    "sla": "SLA impact",
    "run": "One run in detail",
}
EXPERIMENT_HINT = (
    "dagkube experiment FILE.py --planners auto,wukong,uniform,uniform-opt,non-uniform,"
    "non-uniform-opt --slas avg,p90,p95,p99 --repeat 5"
)

Sections = dict[str, list[tuple[str, dict | None]]]  # section key -> (text, chart or None)

_SCRIPT_JSON_ESCAPES = str.maketrans(
    {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}
)


def script_json(value: Any) -> str:
    """``value`` as JSON that is safe inside an HTML ``<script>`` block: no string in it can
    close the block (``</script>``), open a comment (``<!--``) or end a JavaScript line
    (U+2028/U+2029). These characters only occur inside JSON strings, where the ``\\uXXXX``
    escapes decode to the same text."""
    return json.dumps(value).translate(_SCRIPT_JSON_ESCAPES)


async def load_histories(
    redis: Any, *, workflow: str | None, since: float | None, limit: int
) -> list[RunHistory]:
    """The runs a report covers: the newest ``limit`` (of ``workflow`` if given), submitted
    at or after ``since``."""
    found = []
    for run_id in await run_ids(redis, workflow=workflow, limit=limit):
        history = await read_run(redis, run_id)
        if history is None or (since is not None and history.run.submitted_at < since):
            continue
        found.append(history)
    return found


def _sections(histories: list[RunHistory], run_id: str | None) -> Sections:
    """Each section's texts and charts; the run in detail is ``run_id``, else the newest
    succeeded run with a DAG."""
    sections: Sections = {key: [] for key in SECTIONS}
    if not histories:
        return sections
    sections["planners"] = list(planner_sections(histories))
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
        else [h for h in histories if h.run.status == RunStatus.SUCCEEDED and h.edges]
    )
    if chosen:
        sections["run"] = list(run_figures(max(chosen, key=lambda h: h.run.submitted_at)))
    return sections


def _body(histories: list[RunHistory], sections: Sections, title: str) -> tuple[str, list[dict]]:
    """The page's body HTML, with an empty ``chart-<n>`` element for the n-th of the
    returned charts."""
    figures: list[dict] = []
    body = [f"<h1>{html.escape(title)}</h1>"]
    if not histories:
        body.append(
            '<p class="empty" id="no-history">No runs in the history yet (or none match the '
            f"filters). Run some first, e.g. <code>{html.escape(EXPERIMENT_HINT)}</code>.</p>"
        )
        return "".join(body), figures
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
                figures.append(chart)
        body.append("</section>")
    return "".join(body), figures


def render(
    histories: list[RunHistory], *, run_id: str | None = None, title: str = "dagkube report"
) -> str:
    """The HTML document (plotly.js embedded once)."""
    from plotly.offline import get_plotlyjs

    body, figures = _body(histories, _sections(histories, run_id), title)
    script = "\n".join(
        f"Plotly.newPlot('chart-{i}', {script_json(f['data'])}, {script_json(f['layout'])}, "
        "{responsive: true, displaylogo: false});"
        for i, f in enumerate(figures)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}}
section{{margin-top:2.5em}} .empty{{color:#777}} code{{background:#f3f3f3;padding:0 .3em}}</style>
<script>window.dagkubeErrors=[];window.addEventListener('error',function(e){{
window.dagkubeErrors.push(String(e.message));}});</script>
<script>{get_plotlyjs()}</script></head>
<body data-charts="{len(figures)}">
{body}
<script>
try {{
{script}
}} catch (e) {{ window.dagkubeErrors.push(String(e)); }}
document.body.setAttribute('data-rendered', document.querySelectorAll('.js-plotly-plot').length);
document.body.setAttribute('data-errors', JSON.stringify(window.dagkubeErrors));
</script>
</body></html>
"""
