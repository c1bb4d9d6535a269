"""The Prometheus exporter on real run history: promtool accepts its exposition, its labels are
bounded, and a real Prometheus scrapes it and answers queries with the runs' numbers."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from dagkube.metrics.exporter import ALLOWED_LABELS, SPECS, RunHistoryCollector
from dagkube.runtime.embedded import _free_port
from tests.conftest import ROOT, wait_until

# A random-looking id (run, worker, pool suffixes): hex digits mixing letters and digits.
HEXISH = re.compile(r"(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{6,}")
DB = 7  # a database of its own: the counts below are this module's runs only


def dashboard_queries() -> list[tuple[Path, str, str]]:
    found = []
    for path in sorted((ROOT / "charts/dagkube/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                found.append((path, panel["title"], target["expr"]))
    return found


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"{name} is not installed: `make system-deps` installs Debian's prometheus package"
        )
    return found


@pytest.fixture(scope="module")
def history(redis_server, tmp_path_factory) -> Iterator[dict]:
    """A small matrix of real runs (planners, optimizations, two SLAs) in database DB."""
    import sys

    sys.path.insert(0, str(ROOT / "examples"))
    import long_then_wide
    import straggler

    from dagkube import LocalRuntime

    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    runs = []
    with LocalRuntime(url, home=tmp_path_factory.mktemp("home"), max_workers=6) as rt:
        for planner, sla in [
            ("wukong", "avg"),
            ("uniform", "avg"),
            ("non-uniform", "p90"),
            ("uniform-opt", "p90"),
            ("wukong-opt", "avg"),
        ]:
            for module in (long_then_wide, straggler):
                wf = module.build() if module is long_then_wide else module.build(stall=False)
                module.verify(wf.run(planner, sla, runtime=rt))
                runs.append((wf.name, planner, sla, wf.last_run.run_id))
        pool = rt.pool
        collector = RunHistoryCollector(client, [pool])
        registry = CollectorRegistry()
        registry.register(collector)
        port = _free_port()
        server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
        try:
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            yield {"runs": runs, "port": port, "text": text}
        finally:
            server.shutdown()
            thread.join(5)
            client.flushdb()
            client.close()


def test_promtool_accepts_the_exposition(history) -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "metrics"],
        input=history["text"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_labels_are_bounded(history) -> None:
    ids = {run_id for *_, run_id in history["runs"]}
    families = list(text_string_to_metric_families(history["text"]))
    seen = {family.name for family in families}
    assert {name.removesuffix("_total") for name in seen} >= {
        name for name in SPECS if name in seen or name + "_total" in seen
    }
    for family in families:
        series = {
            tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            for sample in family.samples
        }
        assert len(series) <= 200, f"{family.name}: {len(series)} label sets"
        for sample in family.samples:
            extra = set(sample.labels) - ALLOWED_LABELS - {"le"}
            assert not extra, f"{sample.name} has unexpected labels {extra}"
            for value in sample.labels.values():
                assert value not in ids, f"{sample.name} carries a run id"
                assert "#" not in value, f"{sample.name} carries a task id: {value}"
                assert not HEXISH.search(value), f"{sample.name} carries an id: {value!r}"


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_metrics_count_what_the_runs_did(history) -> None:
    text, runs = history["text"], history["runs"]
    assert _value(text, "dagkube_runs_total", status="succeeded") == len(runs)
    assert _value(text, "dagkube_runs_total", planner="uniform-opt") == 2
    assert _value(text, "dagkube_run_makespan_seconds_count") == len(runs)
    assert _value(text, "dagkube_task_duration_seconds_count", function="prepare") == 5
    starts = _value(text, "dagkube_worker_starts_total")
    assert starts >= len(runs)
    assert _value(text, "dagkube_gigabyte_seconds_total") > 0
    assert _value(text, "dagkube_optimizations_applied_total", optimization="prewarm") == 4


def test_a_real_prometheus_scrapes_the_exporter(history, tmp_path: Path) -> None:
    port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: dagkube\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{history['port']}']\n"
    )
    process = subprocess.Popen(
        [
            _tool("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def query(expr: str) -> list:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.load(response)["data"]["result"]
        except OSError:
            return []

    try:
        found = wait_until(lambda: query("sum(dagkube_runs_total)"), 60, "a scrape")
        assert float(found[0]["value"][1]) == len(history["runs"])
        by_planner = query("sum by (planner) (dagkube_gigabyte_seconds_total)")
        assert {r["metric"]["planner"] for r in by_planner} == {p for _, p, _, _ in history["runs"]}
        p90 = query(
            "histogram_quantile(0.9, sum by (le) (dagkube_run_prediction_error_ratio_bucket))"
        )
        assert p90 and float(p90[0]["value"][1]) >= 0
        # Every panel of every dashboard has data (rates need a few scrapes first).
        wait_until(
            lambda: (
                (r := query("count_over_time(dagkube_runs_total[1m])"))
                and float(r[0]["value"][1]) >= 4
            ),
            60,
            "four scrapes",
        )
        empty = []
        for path, title, expr in dashboard_queries():
            concrete = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s")
            if not query(concrete):
                empty.append(f"{path.name} / {title}: {expr}")
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
