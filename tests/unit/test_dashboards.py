"""The Grafana dashboards, structurally: ids, the datasource variable, panel types, PromQL that
parses and names only metrics the exporter serves. (tests/integration/test_metrics.py checks
that every query returns data from a real Prometheus.)"""

from __future__ import annotations

import json
import re
from pathlib import Path

import promql_parser
import pytest

from dagkube.metrics.exporter import LIVE, SPECS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "charts/dagkube/dashboards").glob("*.json"))
PANEL_TYPES = {"timeseries", "stat", "barchart", "table", "bargauge"}


def served_names() -> set[str]:
    names = set(LIVE)
    for name, spec in SPECS.items():
        if spec.buckets is None:
            names.add(f"{name}_total")
        else:
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_there_are_the_four_dashboards():
    assert {p.stem for p in DASHBOARDS} == {"overview", "planners", "optimizations", "workers"}


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_structure_and_queries(path: Path):
    board = json.loads(path.read_text())
    [variable] = [v for v in board["templating"]["list"] if v["type"] == "datasource"]
    assert variable["query"] == "prometheus"
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    served = served_names()
    for panel in board["panels"]:
        assert panel["type"] in PANEL_TYPES, panel["type"]
        assert panel["datasource"]["uid"] == "${datasource}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            expr = target["expr"].replace("$__rate_interval", "1m")
            promql_parser.parse(expr)  # raises on invalid PromQL
            used = set(re.findall(r"\b(dagkube_[a-z_]+)\b", expr))
            assert used <= served, f"{panel['title']}: unknown metrics {used - served}"


def test_dashboards_are_generated_from_tools_make_dashboards():
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_dashboards", ROOT / "tools/make_dashboards.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for uid, (title, panels) in module.DASHBOARDS.items():
        expected = module.dashboard(uid, title, panels)
        assert json.loads((ROOT / f"charts/dagkube/dashboards/{uid}.json").read_text()) == expected
