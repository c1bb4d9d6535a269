"""The Prometheus exporter against the real things: a matrix of real runs (planners with and
without optimizations, two SLAs, runs that pre-warm, pre-load, duplicate a straggler, one that
fails), scraped every second by a real Prometheus (Debian's package) while it runs. Then every
PromQL expression of every Grafana dashboard panel must return data from that Prometheus,
``promtool check metrics`` must accept the exposition, and no label may carry an unbounded
value. The ``dagkube metrics serve`` command is checked on the same history."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

import dagkube
from dagkube.metrics.catalogue import ALLOWED_LABELS, SPECS, WORKER_STATES, exposed_names
from dagkube.metrics.exporter import RunHistoryCollector
from dagkube.runtime.embedded import _free_port
from tests import history_records
from tests.conftest import ROOT, run_cli, stop_process, wait_until

pytestmark = pytest.mark.integration

DASHBOARDS = ROOT / "charts/dagkube/dashboards"
DB = 7  # a database of its own: the counts below are this module's runs only
MEMORY_DB = 10  # the hand-written OOM run's
# Values Grafana puts in for its built-in variables (a 1 s scrape interval); the dashboards'
# own variables take their "All" value or their default.
BUILTINS = {"__rate_interval": "5m", "__interval": "15s", "__range": "1h"}
VARIABLE = re.compile(r"\$\{?(\w+)\}?")
# A random-looking id (run id suffixes, worker ids): hex digits mixing letters and digits.
HEXISH = re.compile(r"(?=[0-9a-f]*[0-9])(?=[0-9a-f]*[a-f])[0-9a-f]{6,}")
MAX_SERIES_PER_FAMILY = 300


def _tool(name: str) -> str:
    """Debian's prometheus package ships both binaries; CI installs it (make system-deps)."""
    for candidate in (f"/usr/bin/{name}", shutil.which(name)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise AssertionError(
        f"{name} is not installed: `make system-deps` (or `apt-get install prometheus`) "
        "installs Debian's prometheus package, which ships prometheus and promtool"
    )


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with Grafana's variables substituted) of every target."""
    found = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        board = json.loads(path.read_text())
        values = dict(BUILTINS, datasource="prometheus")
        for variable in board["templating"]["list"]:
            if variable["type"] == "query":
                current = variable["current"]["value"]
                values[variable["name"]] = ".*" if variable.get("includeAll") else current
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = VARIABLE.sub(lambda m, v=values: v[m.group(1)], target["expr"])
                found.append((path.stem, panel["title"], expr))
    return found


class Prometheus:
    """A real Prometheus on a free loopback port, scraping ``target`` every second."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = _free_port()
        config = directory / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: dagkube\n    static_configs:\n"
            f"      - targets: ['{target}']\n"
        )
        self.log = directory / "prometheus.log"
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    _tool("prometheus"),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={directory / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--storage.tsdb.retention.time=1d",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(self.ready, 30, "Prometheus to be ready")

    def ready(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{self.log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode(
            {"query": expr}
        )
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"{expr}: {exc.code} {exc.read().decode()}") from None
        assert answer["status"] == "success", answer
        return answer["data"]["result"]

    def stop(self) -> None:
        stop_process(self.process, timeout_s=20)


@dagkube.task
def load_rows(count: int) -> list[int]:
    return list(range(count))


@dagkube.task
def parse_rows(rows: list[int]) -> int:
    raise KeyError(f"column 'price' missing in {len(rows)} rows")


def _run_matrix(rt: Any, marker_dir: Path) -> list[dict[str, str]]:
    """Planners with and without optimizations at two SLAs, on workflows made to trigger
    each optimization (examples/): about 30 s on two cores."""
    sys.path.insert(0, str(ROOT / "examples"))
    import large_fanin
    import long_then_wide
    import straggler

    from dagkube.errors import TaskFailed

    runs: list[dict[str, str]] = []

    def run(module: Any, wf: Any, planner: str, sla: str, **options: Any) -> None:
        module.verify(wf.run(planner, sla, runtime=rt, **options))
        label = " + ".join([planner, ",".join(options.get("optimizations", []))]).strip(" +")
        runs.append({"workflow": wf.name, "planner": label, "sla": sla, "id": wf.last_run.run_id})

    # taskdup: history of a fast fetch, then a run whose fetch stalls.
    for planner, sla in [("wukong", "avg"), ("uniform", "avg"), ("non-uniform", "p90")]:
        run(straggler, straggler.build(stall=False, marker_dir=str(marker_dir)), planner, sla)
    run(straggler, straggler.build(stall=True, marker_dir=str(marker_dir)), "uniform-opt", "avg")
    # preload: history of the producers, then the fan-in pre-loads its inputs.
    for planner, sla in [("uniform", "avg"), ("uniform", "p90"), ("non-uniform", "avg")]:
        run(large_fanin, large_fanin.build(), planner, sla)
    run(large_fanin, large_fanin.build(), "uniform-opt", "p90")
    run(large_fanin, large_fanin.build(), "uniform", "avg", optimizations=["preload"])
    # prewarm: a long task, then a fan-out whose workers would start cold.
    rt.cool_down()
    run(long_then_wide, long_then_wide.build(), "wukong", "avg")
    rt.cool_down()
    run(long_then_wide, long_then_wide.build(), "wukong-opt", "p90")
    # a failure
    failing = dagkube.Workflow(parse_rows(load_rows(5)), name="failing")
    with pytest.raises(TaskFailed):
        failing.run("wukong", "avg", runtime=rt)
    assert failing.last_run is not None
    runs.append(
        {"workflow": "failing", "planner": "wukong", "sla": "avg", "id": failing.last_run.run_id}
    )
    return runs


@pytest.fixture(scope="module")
def matrix(redis_server, tmp_path_factory) -> Iterator[dict[str, Any]]:
    from dagkube import LocalRuntime

    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    home = tmp_path_factory.mktemp("home")
    prometheus = None
    server = thread = None
    try:
        with LocalRuntime(url, home=home, max_workers=6, startup_delay_s=0.4) as rt:
            assert rt.backend is not None
            collector = RunHistoryCollector(client, [rt.pool], workers_alive=rt.backend.alive)
            registry = CollectorRegistry()
            registry.register(collector)
            port = _free_port()
            server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
            prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), f"127.0.0.1:{port}")
            runs = _run_matrix(rt, tmp_path_factory.mktemp("markers"))
            # Every run scraped, then a few more scrapes so that every series has the
            # samples rate() needs.
            wait_until(
                lambda: (
                    (r := prometheus.query("sum(dagkube_runs_total)"))
                    and float(r[0]["value"][1]) == len(runs)
                ),
                60,
                "Prometheus to scrape every run",
            )
            settled = time.time()
            wait_until(
                lambda: float(prometheus.query("timestamp(up)")[0]["value"][1]) > settled + 3,
                30,
                "three more scrapes",
            )
            text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
            yield {
                "runs": runs,
                "text": text,
                "url": url,
                "prometheus": prometheus,
                "pool": rt.pool,
            }
    finally:
        if prometheus is not None:
            prometheus.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
            thread.join(5)
        client.flushdb()
        client.close()


def _value(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def test_the_matrix_exercised_every_optimization(matrix) -> None:
    text, runs = matrix["text"], matrix["runs"]
    assert _value(text, "dagkube_runs_total", status="succeeded") == len(runs) - 1
    assert _value(text, "dagkube_runs_total", status="failed") == 1
    assert _value(text, "dagkube_task_failures_total", function="parse_rows") == 1
    assert {r["sla"] for r in runs} == {"avg", "p90"}
    assert _value(text, "dagkube_run_makespan_seconds_count") == len(runs) - 1
    # What each optimization did, as the exporter counts it from the records.
    assert _value(text, "dagkube_preloaded_inputs_total") >= 1
    assert _value(text, "dagkube_preload_saved_seconds_total") > 0
    assert _value(text, "dagkube_tasks_duplicated_total") >= 1
    assert _value(text, "dagkube_duplicates_won_total") >= 1
    assert _value(text, "dagkube_taskdup_saved_seconds_total") > 1.0  # a 3 s stall, cut short
    assert _value(text, "dagkube_prewarm_requests_total") >= 1
    assert _value(text, "dagkube_prewarm_used_total") >= 1
    assert _value(text, "dagkube_worker_starts_total", start="prewarmed") >= 1
    assert _value(text, "dagkube_prewarm_lead_seconds_count") >= 1
    assert _value(text, "dagkube_prewarm_targets_total") >= 1
    assert _value(text, "dagkube_optimizations_applied_total", planner="uniform + preload") == 1
    assert _value(text, "dagkube_run_optimization_marks_count", planner="uniform-opt") >= 2
    # Resources: the workers' GB-seconds add up to the runs' (lost workers: none here).
    by_class = _value(text, "dagkube_gigabyte_seconds_total")
    per_run = _value(text, "dagkube_run_gigabyte_seconds_sum")
    assert by_class > 0 and math.isclose(by_class, per_run, rel_tol=0.01), (by_class, per_run)
    assert (
        0
        < _value(text, "dagkube_cpu_seconds_used_total")
        <= _value(text, "dagkube_cpu_seconds_allocated_total")
    )
    # Live state of the pool (the runtime is idle now: nothing queued, workers idle).
    assert _value(text, "dagkube_workers", state="idle") >= 1
    assert _value(text, "dagkube_queue_depth") == 0
    assert _value(text, "dagkube_exporter_redis_up") == 1
    assert _value(text, "dagkube_exporter_runs_backlog") == 0


def test_promtool_accepts_the_exposition(matrix) -> None:
    result = subprocess.run(
        [_tool("promtool"), "check", "metrics"],
        input=matrix["text"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert not result.stdout.strip() and not result.stderr.strip(), result.stdout + result.stderr


def test_labels_are_bounded(matrix) -> None:
    text, runs = matrix["text"], matrix["runs"]
    forbidden = {r["id"] for r in runs} | {matrix["pool"]}
    families = list(text_string_to_metric_families(text))
    names = {sample.name for family in families for sample in family.samples}
    assert names <= exposed_names(), f"not declared in SPECS: {names - exposed_names()}"
    values_per_label: dict[str, set[str]] = {}
    for family in families:
        series = {
            tuple(sorted((k, v) for k, v in sample.labels.items() if k != "le"))
            for sample in family.samples
        }
        assert len(series) <= MAX_SERIES_PER_FAMILY, f"{family.name}: {len(series)} label sets"
        for sample in family.samples:
            extra = set(sample.labels) - ALLOWED_LABELS - {"le"}
            assert not extra, f"{sample.name} has labels outside the allowed set: {extra}"
            for label, value in sample.labels.items():
                if label == "le":
                    continue
                values_per_label.setdefault(label, set()).add(value)
                assert value not in forbidden, f"{sample.name}: {label}={value!r} is an id"
                assert "#" not in value, f"{sample.name}: {label}={value!r} is a task id"
                assert not HEXISH.search(value), (
                    f"{sample.name}: {label}={value!r} looks like an id"
                )
    # Each label takes a handful of values, not one per run, task or worker.
    for label, values in values_per_label.items():
        assert len(values) <= 20, f"label {label} has {len(values)} values: {sorted(values)}"
    assert values_per_label["state"] <= set(WORKER_STATES)
    assert len(forbidden) == len(runs) + 1


def test_every_dashboard_query_returns_data(matrix) -> None:
    prometheus = matrix["prometheus"]
    queries = dashboard_queries()
    assert len(queries) >= 30
    assert not [q for q in queries if "$" in q[2]], "variables left in queries"
    empty, nan_only = [], []
    for board, title, expr in queries:
        result = prometheus.query(expr)
        if not result:
            empty.append(f"{board} / {title}: {expr}")
        elif all(math.isnan(float(r["value"][1])) for r in result):
            nan_only.append(f"{board} / {title}: {expr}")
    assert not empty, "panel queries without data:\n" + "\n".join(empty)
    assert not nan_only, "panel queries with only NaN:\n" + "\n".join(nan_only)


def test_prometheus_sees_the_matrix_numbers(matrix) -> None:
    prometheus, runs = matrix["prometheus"], matrix["runs"]
    by_planner = prometheus.query("sum by (planner) (dagkube_runs_total)")
    planners = {r["metric"]["planner"]: float(r["value"][1]) for r in by_planner}
    expected: dict[str, float] = {}
    for r in runs:
        expected[r["planner"]] = expected.get(r["planner"], 0) + 1
    assert planners == expected
    assert {"wukong", "uniform", "non-uniform", "uniform-opt", "wukong-opt"} <= set(planners)
    sla = prometheus.query("sum by (sla) (dagkube_run_sla_total)")
    assert {r["metric"]["sla"] for r in sla} == {"avg", "p90"}
    # Live gauges were scraped while the matrix ran: workers were busy and starting then.
    busy = prometheus.query('max_over_time(sum(dagkube_workers{state="busy"})[5m:1s])')
    assert busy and float(busy[0]["value"][1]) >= 1
    starting = prometheus.query('max_over_time(sum(dagkube_workers{state="starting"})[5m:1s])')
    assert starting and float(starting[0]["value"][1]) >= 1


def test_late_prewarm_counts_are_folded(matrix) -> None:
    """An unused pre-warmed worker idles out after its run ended and charges the run's
    history then (ADD_TO_RUN): the exporter re-reads such runs while they settle."""
    from dagkube.store.calls import AddToRunCall
    from dagkube.store.scripts import call_sync

    client = redis.Redis.from_url(matrix["url"])
    [run] = [r for r in matrix["runs"] if r["planner"] == "wukong-opt"]
    collector = RunHistoryCollector(client)

    def wasted() -> tuple[float, float]:
        found = {
            sample.name: sample.value
            for family in collector.collect()
            for sample in family.samples
            if sample.labels.get("planner") == "wukong-opt"
        }
        return (
            found["dagkube_prewarm_wasted_total"],
            found["dagkube_prewarm_wasted_gigabyte_seconds_total"],
        )

    try:
        before = wasted()
        wasted_once = {"prewarm_wasted": 1, "prewarm_wasted_gb_s": 2.5}
        assert call_sync(client, AddToRunCall(run_id=run["id"], increments=wasted_once)).added
        assert wasted() == (before[0] + 1, before[1] + 2.5)
    finally:
        undo = {"prewarm_wasted": -1, "prewarm_wasted_gb_s": -2.5}
        call_sync(client, AddToRunCall(run_id=run["id"], increments=undo))
        client.close()


def test_a_scrape_folds_a_bounded_number_of_runs_and_survives_redis_going_away(
    matrix,
) -> None:
    """With a budget of 4 runs per scrape the history is folded over several scrapes (the
    backlog gauge counts down) to the same totals as one unbounded scrape; when Redis goes
    away the exporter says so and keeps serving what it folded."""

    def values(collector: RunHistoryCollector) -> dict[str, float]:
        found: dict[str, float] = {}
        for family in collector.collect():
            for sample in family.samples:
                if not sample.labels:
                    found[sample.name] = sample.value
                elif sample.name == "dagkube_runs_total":
                    found[sample.name] = found.get(sample.name, 0.0) + sample.value
        return found

    client = redis.Redis.from_url(matrix["url"])
    total = len(matrix["runs"])
    bounded = RunHistoryCollector(client, max_runs_per_scrape=4)
    backlogs = []
    while True:
        found = values(bounded)
        backlogs.append(found["dagkube_exporter_runs_backlog"])
        if not backlogs[-1]:
            break
        assert len(backlogs) <= total, backlogs
    assert backlogs == [max(0, total - 4 * n) for n in range(1, len(backlogs) + 1)]
    assert found["dagkube_exporter_runs_folded_total"] == total
    # Label sets folded after the first scrape are shown at 0 once (so rate() counts their
    # first runs): one more scrape shows every total.
    found = values(bounded)
    assert found["dagkube_runs_total"] == values(RunHistoryCollector(client))["dagkube_runs_total"]
    assert found["dagkube_exporter_redis_up"] == 1
    bounded.redis = redis.Redis(port=_free_port(), socket_connect_timeout=1)
    away = values(bounded)
    assert away["dagkube_exporter_redis_up"] == 0
    assert away["dagkube_runs_total"] == found["dagkube_runs_total"] == total
    client.close()


def test_metrics_serve_command(matrix) -> None:
    """`dagkube metrics serve` on the same history; a taken port is a clear error; Ctrl-C
    stops it."""
    port = _free_port()
    env = dict(os.environ)
    process = subprocess.Popen(
        [sys.executable, "-m", "dagkube.cli", "metrics", "serve", "--port", str(port)],
        env={**env, "DAGKUBE_REDIS_URL": matrix["url"]},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def scrape() -> str:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                    return r.read().decode()
            except OSError:
                return ""

        text = wait_until(scrape, 30, "dagkube metrics serve to answer")
        assert _value(text, "dagkube_runs_total") == len(matrix["runs"])
        assert "dagkube_workers{" not in text  # no pool of its own: no live state
        taken = run_cli(
            "metrics", "serve", "--port", str(port), env={"DAGKUBE_REDIS_URL": matrix["url"]}
        )
        assert taken.returncode == 2, taken.stderr
        assert f"--port {port}: cannot listen there" in taken.stderr
    finally:
        process.send_signal(signal.SIGINT)
        _out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert "stopped" in err
    unreachable = run_cli("metrics", "serve", "--redis", f"redis://127.0.0.1:{_free_port()}/0")
    assert unreachable.returncode == 3 and "Cannot read the run history" in unreachable.stderr


def test_every_spec_is_documented() -> None:
    docs = (ROOT / "docs/metrics.md").read_text()
    missing = [
        name
        for spec in SPECS.values()
        for name in sorted(spec.exposed())
        if not name.endswith(("_bucket", "_sum", "_count")) and f"`{name}`" not in docs
    ]
    missing += [
        spec.name
        for spec in SPECS.values()
        if spec.kind == "histogram" and f"`{spec.name}`" not in docs
    ]
    assert not missing, f"metrics missing from docs/metrics.md: {missing}"


def test_peak_memory_and_oom_kills_are_exported(redis_server) -> None:
    """A run with an OOM-killed attempt, from known records: every measured peak lands in
    its byte bucket, each OOM-killed attempt counts for its function, the run's kills and
    escalations for the run."""
    url = redis_server.url.rsplit("/", 1)[0] + f"/{MEMORY_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    try:
        history_records.store(client, history_records.oom_run())
        samples = [s for f in RunHistoryCollector(client).collect() for s in f.samples]
    finally:
        client.flushdb()
        client.close()

    def values(name: str, **labels: str) -> dict[str, float]:
        return {
            s.labels.get("le", ""): s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        }

    task = {"workflow": "mem-demo", "planner": "wukong"}
    mib = 1024 * 1024
    for function, fits_mib, peak_mib in (("load", 256, 180), ("hog", 1024, 700)):
        buckets = values("dagkube_task_peak_memory_bytes_bucket", **task, function=function)
        assert buckets == {
            **{floatToGoString(2**p * mib): float(2**p >= fits_mib) for p in range(6, 15)},
            "+Inf": 1.0,
        }, function
        assert values("dagkube_task_peak_memory_bytes_sum", **task, function=function) == {
            "": peak_mib * mib
        }
        assert values("dagkube_task_peak_memory_bytes_count", **task, function=function) == {
            "": 1.0
        }
    # after#0 was not measured: no observation, so no series for its function
    assert values("dagkube_task_peak_memory_bytes_count", function="after") == {}
    oom = {
        s.labels["function"]: s.value for s in samples if s.name == "dagkube_task_oom_kills_total"
    }
    assert oom == {"load": 0.0, "hog": 1.0, "after": 0.0}
    run = {"workflow": "mem-demo", "planner": "wukong", "sla": "avg"}
    assert values("dagkube_workers_oom_killed_total", **run) == {"": 1.0}
    assert values("dagkube_oom_escalations_total", **run) == {"": 1.0}
    # the killed worker is a lost one too (docs/metrics.md says so)
    assert values("dagkube_workers_lost_total", planner="wukong", memory_class="256Mi") == {"": 1.0}
