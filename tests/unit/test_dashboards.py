"""The Grafana dashboards, structurally: unique ids, the Prometheus datasource variable used by
every panel, target and variable query, known panel types, Grafana variables that exist, PromQL
that parses (promql-parser) and names only metrics the exporter serves, and files that match
their generator. (tests/integration/test_prometheus.py checks that every query returns data
from a real Prometheus after real runs.)"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

import promql_parser
import pytest

from dagkube.metrics.catalogue import exposed_names

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "charts/dagkube/dashboards").glob("*.json"))
PANEL_TYPES = {"timeseries", "stat", "barchart", "table", "bargauge"}
BUILTINS = {"__rate_interval": "5m", "__interval": "15s", "__range": "1h"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")


def boards() -> dict[str, dict[str, Any]]:
    return {path.stem: json.loads(path.read_text()) for path in DASHBOARDS}


def concrete(expr: str, variables: dict[str, str]) -> str:
    """The expression with Grafana's variables replaced as Grafana would."""

    def value(match: re.Match[str]) -> str:
        name = match.group(1)
        assert name in variables, f"unknown variable ${name} in {expr}"
        return variables[name]

    return VARIABLE.sub(value, expr)


def test_there_are_the_four_dashboards_and_no_placeholder() -> None:
    assert {p.stem for p in DASHBOARDS} == {"overview", "planners", "optimizations", "workers"}
    assert not (ROOT / "charts/dagkube/dashboards/.gitkeep").exists()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure_and_queries(path: Path) -> None:
    board = json.loads(path.read_text())
    assert board["uid"] == f"dagkube-{path.stem}" and board["title"]
    assert 36 <= board["schemaVersion"] <= 41
    templating = board["templating"]["list"]
    [datasource] = [v for v in templating if v["type"] == "datasource"]
    assert (datasource["name"], datasource["query"]) == ("datasource", "prometheus")
    variables = dict(BUILTINS, datasource="prometheus")
    for variable in templating:
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == "${datasource}", variable["name"]
            query = variable["query"]["query"]
            assert re.fullmatch(r"label_values\((dagkube_\w+), (\w+)\)", query), query
            variables[variable["name"]] = ".*" if variable.get("includeAll") else "wukong"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    served = exposed_names()
    for panel in board["panels"]:
        title = panel["title"]
        assert panel["type"] in PANEL_TYPES, f"{title}: {panel['type']}"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], title
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"} and panel["gridPos"]["w"] <= 24
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), title
        for target in panel["targets"]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
            expr = concrete(target["expr"], variables)
            try:
                promql_parser.parse(expr)
            except Exception as exc:  # the parser raises ValueError subclasses
                raise AssertionError(f"{title}: invalid PromQL {expr!r}: {exc}") from None
            used = set(re.findall(r"\b(dagkube_\w+)", expr))
            assert used, f"{title}: queries no dagkube metric"
            assert used <= served, f"{title}: metrics the exporter does not serve {used - served}"
            assert target["instant"] == (panel["type"] != "timeseries"), title


def test_panels_answer_the_issue_questions() -> None:
    """The panels the dashboards promise (issue 5, item 2), by the metrics they query."""
    exprs = {
        name: " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
        for name, board in boards().items()
    }
    wanted = {
        "overview": [
            "dagkube_runs_total",
            "dagkube_run_makespan_seconds_bucket",
            "dagkube_task_failures_total",
            "dagkube_workers",
            "dagkube_queue_depth",
        ],
        "planners": [
            "dagkube_run_makespan_seconds_sum",
            "dagkube_run_execution_seconds_sum",
            "dagkube_run_gigabyte_seconds_sum",
            "dagkube_run_sla_total",
            "dagkube_run_prediction_error_ratio_bucket",
        ],
        "optimizations": [
            "dagkube_prewarm_lead_seconds_bucket",
            "dagkube_prewarm_used_total",
            "dagkube_prewarm_wasted_total",
            "dagkube_worker_starts_total",
            "dagkube_task_input_wait_seconds_sum",
            "dagkube_tasks_duplicated_total",
            "dagkube_taskdup_saved_seconds_total",
            "dagkube_run_optimization_marks_bucket",
        ],
        "workers": [
            "dagkube_worker_starts_total",
            "dagkube_worker_startup_seconds_bucket",
            "dagkube_cpu_seconds_used_total",
            "dagkube_gigabyte_seconds_total",
        ],
    }
    for name, metrics in wanted.items():
        missing = [m for m in metrics if m not in exprs[name]]
        assert not missing, f"{name}: no panel queries {missing}"
    # makespan, execution time and GB-seconds per planner side by side in one chart
    [side_by_side] = [
        p
        for p in boards()["planners"]["panels"]
        if p["type"] == "barchart"
        and {"makespan", "execution", "gigabyte"}
        <= {
            w for t in p["targets"] for w in ("makespan", "execution", "gigabyte") if w in t["expr"]
        }
        and "$baseline" in json.dumps(p["targets"])
    ]
    assert len(side_by_side["targets"]) == 3


def test_dashboards_are_generated_from_tools_make_dashboards() -> None:
    spec = importlib.util.spec_from_file_location(
        "make_dashboards", ROOT / "tools/make_dashboards.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for uid in module.DASHBOARDS:
        path = ROOT / f"charts/dagkube/dashboards/{uid}.json"
        assert path.read_text() == module.render(uid), (
            f"{path.name} differs from tools/make_dashboards.py: run it"
        )
