"""Write the Grafana dashboards of charts/dagkube/dashboards/ from the panel lists below.

    .venv/bin/python tools/make_dashboards.py

Every panel queries the exporter's metrics (docs/metrics.md) through the `datasource`
template variable; tests/integration/test_metrics.py evaluates every expression against a
real Prometheus after real runs, and tests/unit/test_dashboards.py checks the structure.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "charts" / "dagkube" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
W = "[$__rate_interval]"


def panel(title: str, kind: str, exprs: dict[str, str], unit: str = "short", w: int = 12) -> dict:
    return {
        "title": title,
        "type": kind,
        "datasource": DS,
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
            for i, (legend, expr) in enumerate(exprs.items())
        ],
        "gridPos": {"w": w, "h": 8},
    }


DASHBOARDS = {
    "overview": (
        "dagkube: overview",
        [
            panel("Runs by status", "stat", {"{{status}}": "sum by (status) (dagkube_runs_total)"}),
            panel(
                "Run throughput (runs/s)",
                "timeseries",
                {"{{status}}": f"sum by (status) (rate(dagkube_runs_total{W}))"},
                "reqps",
            ),
            panel(
                "Makespan percentiles",
                "timeseries",
                {
                    f"p{q}": f"histogram_quantile(0.{q}, sum by (le) "
                    f"(rate(dagkube_run_makespan_seconds_bucket{W})))"
                    for q in (50, 90, 99)
                },
                "s",
            ),
            panel(
                "Task failures and retries",
                "timeseries",
                {
                    "failures {{function}}": "sum by (function) (dagkube_task_failures_total)",
                    "retries {{function}}": "sum by (function) (dagkube_task_retries_total)",
                },
            ),
            panel(
                "Workers by state", "timeseries", {"{{state}}": "sum by (state) (dagkube_workers)"}
            ),
            panel(
                "Queue depth by class",
                "timeseries",
                {"{{memory_class}}": "sum by (memory_class) (dagkube_queue_depth)"},
            ),
        ],
    ),
    "planners": (
        "dagkube: planners",
        [
            panel(
                "Per planner: median makespan, mean task execution, GB-s per run",
                "barchart",
                {
                    "makespan p50 {{planner}}": "histogram_quantile(0.5, sum by (le, planner) "
                    "(dagkube_run_makespan_seconds_bucket))",
                    "execution s/run {{planner}}": "sum by (planner) "
                    "(dagkube_task_duration_seconds_sum) / sum by (planner) (dagkube_runs_total)",
                    "GB-s/run {{planner}}": "sum by (planner) (dagkube_gigabyte_seconds_total) / "
                    "sum by (planner) (dagkube_runs_total)",
                },
                w=24,
            ),
            panel(
                "Makespan and GB-s relative to wukong",
                "table",
                {
                    "makespan ratio {{planner}}": "(sum by (planner) "
                    "(dagkube_run_makespan_seconds_sum) / sum by (planner) "
                    "(dagkube_run_makespan_seconds_count)) / scalar("
                    "sum(dagkube_run_makespan_seconds_sum{planner='wukong'}) / "
                    "sum(dagkube_run_makespan_seconds_count{planner='wukong'}))",
                    "GB-s ratio {{planner}}": "(sum by (planner) (dagkube_gigabyte_seconds_total)"
                    " / sum by (planner) (dagkube_runs_total)) / scalar("
                    "sum(dagkube_gigabyte_seconds_total{planner='wukong'}) / "
                    "sum(dagkube_runs_total{planner='wukong'}))",
                },
                "percentunit",
            ),
            panel(
                "SLA attainment by SLA",
                "bargauge",
                {
                    "{{sla}}": "sum by (sla) (dagkube_run_sla_total{outcome='met'}) / "
                    "sum by (sla) (dagkube_run_sla_total)"
                },
                "percentunit",
            ),
            panel(
                "Prediction error (p50, p90 of |predicted - actual| / actual)",
                "timeseries",
                {
                    f"p{q} {{{{planner}}}}": f"histogram_quantile(0.{q}, sum by (le, planner) "
                    "(dagkube_run_prediction_error_ratio_bucket))"
                    for q in (50, 90)
                },
                "percentunit",
            ),
            panel(
                "Predicted vs measured makespan (mean)",
                "timeseries",
                {
                    "predicted {{planner}}": "sum by (planner) "
                    "(dagkube_run_predicted_makespan_seconds_sum) / sum by (planner) "
                    "(dagkube_run_predicted_makespan_seconds_count)",
                    "measured {{planner}}": "sum by (planner) (dagkube_run_makespan_seconds_sum)"
                    " / sum by (planner) (dagkube_run_makespan_seconds_count)",
                },
                "s",
            ),
        ],
    ),
    "optimizations": (
        "dagkube: optimizations",
        [
            panel(
                "Pre-warm: requested, used, wasted",
                "barchart",
                {
                    "requested": "sum(dagkube_prewarm_requests_total)",
                    "used": "sum(dagkube_prewarm_used_total)",
                    "wasted": "sum(dagkube_prewarm_wasted_total)",
                },
            ),
            panel(
                "Warm-start share by planner",
                "bargauge",
                {
                    "{{planner}}": "sum by (planner) (dagkube_worker_starts_total{start!='cold'})"
                    " / sum by (planner) (dagkube_worker_starts_total)"
                },
                "percentunit",
            ),
            panel(
                "Pre-warm lead time (ready -> used), p50",
                "stat",
                {
                    "p50": "histogram_quantile(0.5, sum by (le) "
                    "(dagkube_prewarm_lead_seconds_bucket))"
                },
                "s",
            ),
            panel(
                "Input-wait per task by planner (mean)",
                "barchart",
                {
                    "{{planner}}": "sum by (planner) (dagkube_task_input_wait_seconds_sum) / "
                    "sum by (planner) (dagkube_task_input_wait_seconds_count)"
                },
                "s",
            ),
            panel(
                "Pre-load: inputs fetched in the background, input-wait saved",
                "stat",
                {
                    "inputs": "sum(dagkube_preloaded_inputs_total)",
                    "saved s": "sum(dagkube_preload_saved_seconds_total)",
                },
            ),
            panel(
                "Task duplication: duplicates run and won",
                "stat",
                {
                    "duplicated": "sum(dagkube_tasks_duplicated_total)",
                    "won": "sum(dagkube_duplicates_won_total)",
                },
            ),
            panel(
                "Optimizations per run, by planner",
                "table",
                {
                    "{{planner}} {{optimization}}": "sum by (planner, optimization) "
                    "(dagkube_optimizations_applied_total) / on (planner) group_left() "
                    "sum by (planner) (dagkube_runs_total)"
                },
                w=24,
            ),
        ],
    ),
    "workers": (
        "dagkube: workers",
        [
            panel(
                "Starts by class: cold, warm, pre-warmed",
                "barchart",
                {
                    "{{memory_class}} {{start}}": "sum by (memory_class, start) "
                    "(dagkube_worker_starts_total)"
                },
            ),
            panel(
                "Start-up time p50 / p90 (queued -> first task)",
                "timeseries",
                {
                    f"p{q} {{{{start}}}}": f"histogram_quantile(0.{q}, sum by (le, start) "
                    "(dagkube_worker_startup_seconds_bucket))"
                    for q in (50, 90)
                },
                "s",
            ),
            panel(
                "CPU utilization (used / allocated) by planner",
                "bargauge",
                {
                    "{{planner}}": "sum by (planner) (dagkube_cpu_seconds_used_total) / "
                    "sum by (planner) (dagkube_cpu_seconds_allocated_total)"
                },
                "percentunit",
            ),
            panel(
                "GB-seconds by class",
                "barchart",
                {"{{memory_class}}": "sum by (memory_class) (dagkube_gigabyte_seconds_total)"},
            ),
            panel(
                "Workers lost (work re-queued)",
                "stat",
                {"lost": "sum(dagkube_workers_lost_total) or vector(0)"},
            ),
        ],
    ),
}


def dashboard(uid: str, title: str, panels: list[dict]) -> dict:
    x = y = 0
    laid = []
    for number, item in enumerate(panels, start=1):
        item = dict(item, id=number)
        w, h = item["gridPos"]["w"], item["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + h
        item["gridPos"] = {"x": x, "y": y, "w": w, "h": h}
        x += w
        laid.append(item)
    return {
        "uid": f"dagkube-{uid}",
        "title": title,
        "tags": ["dagkube"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
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
                }
            ]
        },
        "panels": laid,
    }


def main() -> None:
    for gitkeep in OUT.glob(".gitkeep"):
        gitkeep.unlink()
    for uid, (title, panels) in DASHBOARDS.items():
        path = OUT / f"{uid}.json"
        path.write_text(json.dumps(dashboard(uid, title, panels), indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
