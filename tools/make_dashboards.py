"""Write the Grafana dashboards of charts/dagkube/dashboards/ from the panel lists below.

    .venv/bin/python tools/make_dashboards.py

Every panel queries the exporter's metrics (docs/metrics.md, dagkube/metrics/catalogue.py)
through the `datasource` template variable. tests/integration/test_prometheus.py evaluates
every expression against a real Prometheus after a matrix of real runs and requires data;
tests/unit/test_dashboards.py checks the structure and that the files match this script.

Panels that answer "how does it compare" read the whole history the exporter folded (counters
and cumulative histograms as they are now, instant queries); panels "over time" use
rate()/increase() over `$__rate_interval`: the runs that finished in that window.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parents[1] / "charts" / "dagkube" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
W = "[$__rate_interval]"
WF = 'workflow=~"$workflow"'
OPT = f'planner=~".+-opt", {WF}'
BASE = f'{WF}, planner="$baseline"'
INPUT_WAIT = "dagkube_task_input_wait_seconds"
TIME_SERIES = "timeseries"


def mean(metric: str, by: str, selector: str = "") -> str:
    """Mean of a histogram's observations, by some labels."""
    sel = f"{{{selector}}}" if selector else ""
    return f"sum by ({by}) ({metric}_sum{sel}) / sum by ({by}) ({metric}_count{sel})"


def quantile(q: float, metric: str, by: str = "", selector: str = "", window: bool = False) -> str:
    sel = f"{{{selector}}}" if selector else ""
    series = f"rate({metric}_bucket{sel}{W})" if window else f"{metric}_bucket{sel}"
    labels = ", ".join(["le", *([by] if by else [])])
    return f"histogram_quantile({q}, sum by ({labels}) ({series}))"


def panel(
    title: str,
    kind: str,
    exprs: dict[str, str],
    unit: str = "short",
    w: int = 12,
    h: int = 8,
    description: str = "",
    x_field: str | None = None,
) -> dict[str, Any]:
    """``exprs``: legend -> PromQL. Panels other than time series query the value now
    (instant); bar charts and tables get the series as rows, merged on their labels."""
    instant = kind != TIME_SERIES
    targets = []
    for index, (legend, expr) in enumerate(exprs.items()):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + index),
            "datasource": DS,
            "expr": expr,
            "legendFormat": legend,
            "range": not instant,
            "instant": instant,
        }
        if kind in ("barchart", "table"):
            target["format"] = "table"
        targets.append(target)
    item: dict[str, Any] = {
        "title": title,
        "description": description,
        "type": kind,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": targets,
        "gridPos": {"w": w, "h": h},
    }
    if kind == TIME_SERIES:
        item["options"] = {"legend": {"displayMode": "table", "placement": "bottom"}}
    if kind in ("barchart", "table"):
        renames = {f"Value #{t['refId']}": legend for t, legend in zip(targets, exprs, strict=True)}
        if len(targets) == 1:
            renames = {"Value": next(iter(exprs))}
        item["transformations"] = [
            {"id": "merge", "options": {}},
            {
                "id": "organize",
                "options": {"excludeByName": {"Time": True}, "renameByName": renames},
            },
        ]
    if kind == "barchart":
        item["options"] = {
            "xField": x_field or "planner",
            "showValue": "auto",
            "legend": {"showLegend": True},
        }
    if kind == "bargauge":
        item["options"] = {"displayMode": "gradient", "orientation": "horizontal"}
    return item


OVERVIEW = [
    panel(
        "Runs by status (history)",
        "stat",
        {"{{status}}": "sum by (status) (dagkube_runs_total)"},
        description="Finished runs in the Redis history, by final status.",
    ),
    panel(
        "Run throughput by status",
        TIME_SERIES,
        {"{{status}}": f"sum by (status) (rate(dagkube_runs_total{W}))"},
        "reqps",
        description="Runs finishing per second.",
    ),
    panel(
        "Makespan percentiles (runs finished in the window)",
        TIME_SERIES,
        {
            f"p{int(q * 100)}": quantile(q, "dagkube_run_makespan_seconds", window=True)
            for q in (0.5, 0.9, 0.99)
        },
        "s",
    ),
    panel(
        "Makespan by workflow (history): p50, p90, mean",
        "table",
        {
            "p50": quantile(0.5, "dagkube_run_makespan_seconds", "workflow"),
            "p90": quantile(0.9, "dagkube_run_makespan_seconds", "workflow"),
            "mean": mean("dagkube_run_makespan_seconds", "workflow"),
        },
        "s",
    ),
    panel(
        "Failures: runs not succeeded, task failures, task retries (in the window)",
        TIME_SERIES,
        {
            "runs {{status}}": "sum by (status) "
            f'(increase(dagkube_runs_total{{status!="succeeded"}}{W}))',
            "task failures {{function}}": "sum by (function) "
            f"(increase(dagkube_task_failures_total{W}))",
            "retries {{function}}": f"sum by (function) (increase(dagkube_task_retries_total{W}))",
        },
    ),
    panel(
        "Workers by state",
        TIME_SERIES,
        {"{{state}}": "sum by (state) (dagkube_workers)"},
        description="Live pools: starting (created, not registered yet), idle, busy, waiting "
        "(bound to a run, blocked on the inputs of its next task).",
    ),
    panel(
        "Queue depth by class",
        TIME_SERIES,
        {"{{memory_class}}": "sum by (memory_class) (dagkube_queue_depth)"},
        description="Invocations waiting for a worker of each memory class (live pools).",
    ),
    panel(
        "Exporter: Redis readable, runs not folded yet",
        "stat",
        {
            "Redis up": "min(dagkube_exporter_redis_up)",
            "backlog": "sum(dagkube_exporter_runs_backlog)",
        },
    ),
]

PLANNERS = [
    panel(
        "Per planner, mean per run: makespan and task execution (s), GB-seconds",
        "barchart",
        {
            "makespan s": mean("dagkube_run_makespan_seconds", "planner", WF),
            "execution s": mean("dagkube_run_execution_seconds", "planner", WF),
            "GB-s": mean("dagkube_run_gigabyte_seconds", "planner", WF),
        },
        w=24,
        description="Execution: the sum of a run's task execution times. Pick one workflow "
        "to compare planners on the same work.",
    ),
    panel(
        "Relative to $baseline: makespan, execution, GB-seconds (1 = the same)",
        "barchart",
        {
            label: f"({mean(metric, 'planner', WF)}) / scalar({mean(metric, 'planner', BASE)})"
            for label, metric in (
                ("makespan", "dagkube_run_makespan_seconds"),
                ("execution", "dagkube_run_execution_seconds"),
                ("GB-s", "dagkube_run_gigabyte_seconds"),
            )
        },
        "percentunit",
        w=24,
        description="E.g. 92% makespan at 110% GB-s: 8% faster for 10% more resources.",
    ),
    panel(
        "SLA attainment by SLA",
        "bargauge",
        {
            "{{sla}}": f'sum by (sla) (dagkube_run_sla_total{{outcome="met", {WF}}}) '
            f"/ sum by (sla) (dagkube_run_sla_total{{{WF}}})"
        },
        "percentunit",
        description="Share of succeeded runs that finished within the makespan predicted at "
        "their SLA (avg, p90, p95, p99).",
    ),
    panel(
        "SLA attainment by planner and SLA",
        "table",
        {
            "attainment": f'sum by (planner, sla) (dagkube_run_sla_total{{outcome="met", {WF}}}) '
            f"/ sum by (planner, sla) (dagkube_run_sla_total{{{WF}}})",
            "runs": f"sum by (planner, sla) (dagkube_run_sla_total{{{WF}}})",
        },
    ),
    panel(
        "Prediction error over time (runs finished in the window)",
        TIME_SERIES,
        {
            "median {{planner}}": quantile(
                0.5, "dagkube_run_prediction_error_ratio", "planner", WF, window=True
            ),
            "mean {{planner}}": f"sum by (planner) (rate(dagkube_run_prediction_error_ratio_sum"
            f"{{{WF}}}{W})) / sum by (planner) (rate(dagkube_run_prediction_error_ratio_count"
            f"{{{WF}}}{W}))",
        },
        "percentunit",
        w=24,
        description="|predicted - measured| / measured makespan.",
    ),
    panel(
        "Predicted vs measured makespan, mean per run",
        "barchart",
        {
            "predicted": mean("dagkube_run_predicted_makespan_seconds", "planner", WF),
            "measured": mean("dagkube_run_makespan_seconds", "planner", WF),
        },
        "s",
    ),
    panel(
        "Prediction error by SLA (history): p50, p90",
        "table",
        {
            "p50": quantile(0.5, "dagkube_run_prediction_error_ratio", "sla", WF),
            "p90": quantile(0.9, "dagkube_run_prediction_error_ratio", "sla", WF),
        },
        "percentunit",
        x_field="sla",
    ),
]

OPTIMIZATIONS = [
    panel(
        "Pre-warm: workers requested, started, used, wasted",
        "barchart",
        {
            label: f"sum by (planner) (dagkube_prewarm_{name}_total{{{WF}}}) and on (planner) "
            f"(sum by (planner) (dagkube_prewarm_requests_total{{{WF}}}) > 0)"
            for label, name in (
                ("requested", "requests"),
                ("started", "started"),
                ("used", "used"),
                ("wasted", "wasted"),
            )
        },
        description="Planners whose runs asked for pre-warmed workers.",
    ),
    panel(
        "Warm-start share by planner (with and without pre-warm)",
        "bargauge",
        {
            "{{planner}}": 'sum by (planner) (dagkube_worker_starts_total{start!="cold"}) '
            "/ sum by (planner) (dagkube_worker_starts_total)"
        },
        "percentunit",
        description="Invocations served by a warm or pre-warmed worker.",
    ),
    panel(
        "Pre-warm timing: worker ready -> used; request due -> target task start",
        "stat",
        {
            "ready -> used p50": quantile(0.5, "dagkube_prewarm_lead_seconds"),
            "ready -> used p90": quantile(0.9, "dagkube_prewarm_lead_seconds"),
            "due -> target start p50": quantile(0.5, "dagkube_prewarm_trigger_to_start_seconds"),
        },
        "s",
        description="How long pre-warmed workers idled before serving, and how far ahead of "
        "its target task a pre-warm request was due.",
    ),
    panel(
        "Pre-warm targets: started after the request (ahead) or before it (late)",
        "bargauge",
        {"{{planner}} {{outcome}}": "sum by (planner, outcome) (dagkube_prewarm_targets_total)"},
    ),
    panel(
        "Pre-load: mean input-wait of fan-in tasks, by planner (with and without pre-load)",
        "barchart",
        {
            "input-wait s": f"({mean(INPUT_WAIT, 'workflow, function, planner', WF)}) "
            "and on (workflow, function) "
            "(sum by (workflow, function) (dagkube_preloaded_inputs_total) > 0)"
        },
        "s",
        w=24,
        description="Functions that had inputs pre-loaded in some run: their input-wait under "
        "every planner.",
    ),
    panel(
        "Pre-load: inputs fetched in the background, input-wait moved off tasks",
        "stat",
        {
            "inputs": f"sum(dagkube_preloaded_inputs_total{{{WF}}})",
            "seconds": f"sum(dagkube_preload_saved_seconds_total{{{WF}}})",
        },
    ),
    panel(
        "Task duplication: duplicates started, won, consumer wait saved (s)",
        "stat",
        {
            "started": f"sum(dagkube_tasks_duplicated_total{{{WF}}})",
            "won": f"sum(dagkube_duplicates_won_total{{{WF}}})",
            "wait saved s": f"sum(dagkube_taskdup_saved_seconds_total{{{WF}}})",
        },
        description="Wait saved: the original's end minus the duplicate's end, where both "
        "finished and the duplicate was first.",
    ),
    panel(
        "Task duplication: wait saved per duplicate, by planner",
        "bargauge",
        {
            "{{planner}}": f"sum by (planner) (dagkube_taskdup_saved_seconds_total{{{WF}}}) / "
            f"(sum by (planner) (dagkube_tasks_duplicated_total{{{WF}}}) > 0)"
        },
        "s",
    ),
    panel(
        "Optimization marks per run, -opt planners: median and mean",
        "table",
        {
            "median": quantile(0.5, "dagkube_run_optimization_marks", "planner, optimization", OPT),
            "mean": mean("dagkube_run_optimization_marks", "planner, optimization", OPT),
        },
        w=24,
        description="How many tasks each optimization marked in a run's plan (median from "
        "histogram buckets, approximate; mean exact).",
    ),
    panel(
        "Pre-warmed workers wasted: GB-seconds",
        "stat",
        {"GB-s": f"sum(dagkube_prewarm_wasted_gigabyte_seconds_total{{{WF}}})"},
    ),
]

WORKERS = [
    panel(
        "Starts by class: cold, warm, pre-warmed",
        "bargauge",
        {
            "{{memory_class}} {{start}}": "sum by (memory_class, start) "
            "(dagkube_worker_starts_total)"
        },
    ),
    panel(
        "Cold-start share by planner",
        "bargauge",
        {
            "{{planner}}": 'sum by (planner) (dagkube_worker_starts_total{start="cold"}) '
            "/ sum by (planner) (dagkube_worker_starts_total)"
        },
        "percentunit",
    ),
    panel(
        "Start-up time (queued -> first task), history: p50, p90 by kind",
        "table",
        {
            "p50": quantile(0.5, "dagkube_worker_startup_seconds", "start"),
            "p90": quantile(0.9, "dagkube_worker_startup_seconds", "start"),
        },
        "s",
        x_field="start",
    ),
    panel(
        "Start-up time over time (p90 of invocations in the window)",
        TIME_SERIES,
        {"{{start}}": quantile(0.9, "dagkube_worker_startup_seconds", "start", window=True)},
        "s",
    ),
    panel(
        "CPU utilization (used / allocated) by planner and class",
        "bargauge",
        {
            "{{planner}} {{memory_class}}": "sum by (planner, memory_class) "
            "(dagkube_cpu_seconds_used_total) / sum by (planner, memory_class) "
            "(dagkube_cpu_seconds_allocated_total)"
        },
        "percentunit",
    ),
    panel(
        "GB-seconds by planner and class",
        "bargauge",
        {
            "{{planner}} {{memory_class}}": "sum by (planner, memory_class) "
            "(dagkube_gigabyte_seconds_total)"
        },
    ),
    panel(
        "CPU-seconds allocated and used, by class",
        "barchart",
        {
            "allocated": "sum by (memory_class) (dagkube_cpu_seconds_allocated_total)",
            "used": "sum by (memory_class) (dagkube_cpu_seconds_used_total)",
        },
        "s",
        x_field="memory_class",
    ),
    panel(
        "Memory held by class over time (GB)",
        TIME_SERIES,
        {"{{memory_class}}": f"sum by (memory_class) (rate(dagkube_gigabyte_seconds_total{W}))"},
        description="GB-seconds per second: the average GB held by workers of runs that "
        "finished in the window.",
    ),
    panel(
        "Workers by state and class",
        TIME_SERIES,
        {"{{memory_class}} {{state}}": "sum by (memory_class, state) (dagkube_workers)"},
    ),
    panel(
        "Workers lost (work re-queued)",
        "stat",
        {"lost": "sum(dagkube_workers_lost_total) or vector(0)"},
    ),
    panel(
        "Workers created for a run but never used, by planner: count and GB-seconds",
        "table",
        {
            "workers": "sum by (planner) (dagkube_workers_unused_total)",
            "GB-s": "sum by (planner) (dagkube_workers_unused_gigabyte_seconds_total)",
        },
        x_field="planner",
        description="The scaler creates a worker per queued invocation; when a worker already "
        "running takes the invocation first, the new one idles until its timeout. Its lifetime "
        "is charged to the run it was created for, outside the run's own GB-seconds.",
    ),
]


def variable_query(name: str, label: str, query: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "definition": query,
        "query": {"query": query, "refId": f"{name}-variable"},
        "refresh": 2,
        "sort": 1,
        "hide": 0,
        **extra,
    }


WORKFLOW_VARIABLE = variable_query(
    "workflow",
    "Workflow",
    "label_values(dagkube_runs_total, workflow)",
    includeAll=True,
    multi=True,
    allValue=".*",
    current={"selected": True, "text": ["All"], "value": ["$__all"]},
)
BASELINE_VARIABLE = variable_query(
    "baseline",
    "Baseline planner",
    "label_values(dagkube_runs_total, planner)",
    current={"selected": True, "text": "wukong", "value": "wukong"},
)

DASHBOARDS: dict[str, tuple[str, list[dict[str, Any]], list[dict[str, Any]]]] = {
    "overview": ("dagkube: overview", OVERVIEW, []),
    "planners": ("dagkube: planners", PLANNERS, [WORKFLOW_VARIABLE, BASELINE_VARIABLE]),
    "optimizations": ("dagkube: optimizations", OPTIMIZATIONS, [WORKFLOW_VARIABLE]),
    "workers": ("dagkube: workers", WORKERS, []),
}


def dashboard(
    uid: str, title: str, panels: list[dict[str, Any]], variables: list[dict[str, Any]]
) -> dict[str, Any]:
    x = y = row_h = 0
    laid = []
    for number, item in enumerate(panels, start=1):
        item = dict(item, id=number)
        w, h = item["gridPos"]["w"], item["gridPos"]["h"]
        if x + w > 24:
            x, y, row_h = 0, y + row_h, 0
        item["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x, row_h = x + w, max(row_h, h)
        laid.append(item)
    return {
        "uid": f"dagkube-{uid}",
        "title": title,
        "tags": ["dagkube"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "time": {"from": "now-24h", "to": "now"},
        "refresh": "30s",
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Prometheus",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                *variables,
            ]
        },
        "annotations": {"list": []},
        "panels": laid,
    }


def render(uid: str) -> str:
    title, panels, variables = DASHBOARDS[uid]
    return json.dumps(dashboard(uid, title, panels, variables), indent=2) + "\n"


def main() -> None:
    for gitkeep in OUT.glob(".gitkeep"):
        gitkeep.unlink()
    for uid in DASHBOARDS:
        path = OUT / f"{uid}.json"
        path.write_text(render(uid))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
