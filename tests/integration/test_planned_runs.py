"""Planned runs (logical workers, several classes) on the real runtime, and predictions."""

from __future__ import annotations

import json
import statistics
import sys
import time

import pytest

import dagkube
from dagkube.store.keys import hist_run
from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.integration

sys.path.insert(0, str(ROOT / "examples"))

import text_analysis  # noqa: E402

DURATIONS = [0.06, 0.06, 0.1, 0.1, 0.16, 0.16, 0.2, 0.24]


@dagkube.task
def prepare() -> int:
    time.sleep(0.04)
    return 7


@dagkube.task
def work(setup: int, index: int, seconds: float) -> tuple[int, float]:
    time.sleep(seconds)
    return index, seconds


@dagkube.task
def combine(results: list) -> list:
    time.sleep(0.02)
    return sorted(results)


def fixed_fanout() -> dagkube.Workflow:
    setup = prepare()
    parts = [work(setup, i, s) for i, s in enumerate(DURATIONS)]
    return dagkube.Workflow(combine(parts), name="planned-fanout")


@pytest.mark.parametrize("planner", ["uniform", "non-uniform"])
def test_planned_runs_are_correct_and_store_their_plan(make_runtime, redis_client, planner):
    rt = make_runtime(max_workers=2)
    wf = text_analysis.build()
    for _ in range(2):  # the second run plans from the first one's history
        text_analysis.verify(wf.run(planner, "p90", "512Mi,1Gi,2Gi", runtime=rt))
    record = wf.last_run.record
    assert record.planner == planner and record.sla == "p90"
    assert record.predicted_makespan_s is not None and record.predicted_makespan_s > 0
    stored = json.loads(redis_client.get(hist_run(wf.last_run.run_id, "plan")))
    assert stored["planner"] == planner and stored["history_runs"] >= 1
    workers = {t["worker_id"] for t in stored["tasks"].values()}
    assert None not in workers and len(workers) > 1
    assert fixed_fanout().run(planner, runtime=rt) == [(i, s) for i, s in enumerate(DURATIONS)]


def test_predictions_converge_and_p90_is_met(make_runtime):
    rt = make_runtime(max_workers=2)
    for _ in range(5):  # history
        fixed_fanout().run("wukong", "avg", "1Gi", runtime=rt)
    errors, within = [], 0
    for index in range(8):
        sla = "avg" if index % 2 == 0 else "p90"
        wf = fixed_fanout()
        planned = wf.plan("wukong", sla, "1Gi", runtime=rt)
        wf.run("wukong", sla, "1Gi", runtime=rt)
        actual = wf.last_run.record.makespan_s
        if sla == "avg":
            errors.append(abs(planned.predicted_makespan_s - actual) / actual)
        else:
            within += actual <= planned.predicted_makespan_s
    assert statistics.median(errors) <= 0.15, errors
    assert within >= 3, within  # of 4 p90 runs


def test_cli_runs_an_example_with_the_non_uniform_planner(redis_server):
    result = run_cli(
        "run",
        str(ROOT / "examples" / "fanout_sleep.py"),
        "--planner",
        "non-uniform",
        "--sla",
        "p95",
        "--json",
        env={"DAGKUBE_REDIS_URL": redis_server.url},
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["verified"] is True and summary["planner"] == "non-uniform"


def test_an_auto_run_records_the_candidate_it_ran(make_runtime):
    rt = make_runtime(max_workers=2)
    wf = fixed_fanout()
    assert wf.run(runtime=rt) == [(i, s) for i, s in enumerate(DURATIONS)]
    record = wf.last_run.record
    assert record.planner == "auto"
    assert record.candidate in ("wukong", "uniform", "non-uniform")
    assert record.candidate == wf.last_plan.chosen_planner()
