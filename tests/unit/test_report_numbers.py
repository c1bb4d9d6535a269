"""The report's numbers on run histories built by hand (no Redis): medians per planner and
their changes, charged GB-s, prediction errors over runs, the critical path and DAG layout,
with/without comparisons, worker starts, pre-warm leads and the memory wording."""

from __future__ import annotations

import dataclasses

import pytest

from dagkube.metrics.history import RunHistory
from dagkube.planning.model import Plan, TaskPlan
from dagkube.report.numbers import (
    charged_gb_s,
    critical_path,
    dag_positions,
    deltas,
    error_series,
    execution_s,
    levels,
    limits_text,
    makespans_by_sla,
    memory_lines,
    mib_text,
    planner_rows,
    prediction_errors,
    prewarm_leads,
    time_parts,
    with_and_without,
    within_prediction,
    worker_starts,
)
from tests.history_records import MIB, T0, oom_run, plain_run


def _with(history: RunHistory, **run_fields) -> RunHistory:
    return dataclasses.replace(history, run=history.run.model_copy(update=run_fields))


def test_planner_rows_take_medians_of_succeeded_runs_and_deltas_compare_to_the_baseline():
    runs = [
        oom_run(),  # wukong: makespan 4.0 s, execution 0.8 + 1.5 + 0.4 s, 3.25 GB-s
        _with(oom_run(), run_id="w2", makespan_s=6.0, gb_s=4.25),
        _with(oom_run(), run_id="w3", status="failed", makespan_s=100.0),  # left out
        plain_run(),  # uniform: makespan 1.5 s, execution 1.0 s, 0.5 GB-s
    ]
    rows = {row.planner: row for row in planner_rows(runs)}
    assert set(rows) == {"wukong", "uniform"}
    assert rows["wukong"].runs == 2
    assert rows["wukong"].makespan_s == pytest.approx(5.0)
    assert rows["wukong"].execution_s == pytest.approx(2.7)
    assert rows["wukong"].gb_s == pytest.approx(3.75)
    changes = deltas(list(rows.values()), "wukong")
    assert changes["wukong"] == {"makespan_s": 0.0, "execution_s": 0.0, "gb_s": 0.0}
    assert changes["uniform"]["makespan_s"] == pytest.approx((1.5 / 5.0 - 1) * 100)
    assert changes["uniform"]["gb_s"] == pytest.approx((0.5 / 3.75 - 1) * 100)


def test_charged_gb_s_adds_the_workers_that_never_served():
    history = _with(plain_run(), prewarm_wasted_gb_s=0.25, workers_unused_gb_s=0.125)
    assert charged_gb_s(history) == pytest.approx(0.5 + 0.25 + 0.125)
    assert execution_s(plain_run()) == pytest.approx(1.0)


def test_prediction_errors_are_relative_to_the_measured_makespan():
    errors = prediction_errors(oom_run())  # predicted 3.5 s, measured 4.0 s, no stored plan
    assert errors == {
        "makespan": pytest.approx(0.125),
        "execution": None,
        "transfer": None,
        "start-up": None,
        "output size": None,
    }
    assert prediction_errors(plain_run())["makespan"] is None  # nothing predicted
    tiny = _with(oom_run(), makespan_s=0.001)
    assert prediction_errors(tiny)["makespan"] is None  # under MIN_MEASURED_S: noise


def test_error_series_numbers_runs_oldest_first_and_keeps_the_avg_sla_runs_apart():
    later = _with(oom_run(), run_id="later", sla="p90", submitted_at=T0 + 100, makespan_s=3.5)
    series = error_series([later, oom_run(), plain_run()])
    # plain_run (oldest, run 1) predicted nothing; oom_run is run 2, "later" run 3.
    assert series.by_run["makespan"] == ([2, 3], [pytest.approx(12.5), pytest.approx(0.0)])
    assert series.avg_sla["makespan"] == [pytest.approx(12.5)]
    assert series.by_run["execution"] == ([], [])


def test_makespans_by_sla_and_the_share_within_the_prediction():
    within = _with(oom_run(), run_id="fast", makespan_s=3.0)
    by_sla = makespans_by_sla([oom_run(), within, plain_run()])
    assert dict(by_sla) == {"avg": [(3.5, 4.0), (3.5, 3.0)]}  # plain_run has no prediction
    assert within_prediction(by_sla["avg"]) == 0.5


def test_critical_path_follows_the_upstream_that_ended_last():
    assert critical_path(oom_run()) == ["load#0", "hog#0", "after#0"]
    assert critical_path(dataclasses.replace(oom_run(), edges={})) == []


def test_levels_and_positions_of_a_diamond():
    edges = {"a": [], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["a", "d"]}
    assert levels(edges) == {"a": 0, "b": 1, "c": 1, "d": 2, "e": 3}
    assert dag_positions(edges) == {"a": (0, 0), "b": (1, 0), "c": (1, 1), "d": (2, 0), "e": (3, 0)}


def test_time_parts_order_tasks_by_start_and_count_from_the_first_ready_task():
    ordered, parts = time_parts(oom_run())
    assert [t.task_id for t in ordered] == ["load#0", "hog#0", "after#0"]
    assert parts["invocation (ready)"] == pytest.approx([0.0, 1.8, 3.4])
    assert parts["execution"] == pytest.approx([0.8, 1.5, 0.4])
    assert parts["start-up (worker)"] == [0.0, 0.0, 0.0]  # no start-up measured


def test_with_and_without_compares_the_same_tasks_in_both_arms():
    base = oom_run()
    served = [
        t.model_copy(update={"preloaded": ["load#0"], "input_wait_s": 0.1})
        if t.task_id == "hog#0"
        else t
        for t in base.tasks
    ]
    with_preload = dataclasses.replace(
        base, run=base.run.model_copy(update={"optimizations": ["preload"]}), tasks=served
    )
    slow = [t.model_copy(update={"input_wait_s": 0.7}) for t in base.tasks]
    without = dataclasses.replace(base, tasks=slow)
    arms = with_and_without(
        [with_preload, without, plain_run()],
        "preload",
        lambda t: bool(t.preloaded),
        lambda h, t: t.input_wait_s,
    )
    assert arms == {"mem-demo": {"without preload": [0.7], "with preload": [0.1]}}
    # Only one arm: no comparison.
    one_arm = with_and_without(
        [with_preload], "preload", lambda t: bool(t.preloaded), lambda h, t: t.input_wait_s
    )
    assert one_arm == {}


def test_worker_starts_count_served_workers_by_start_kind():
    history = oom_run()
    prewarmed = history.workers[0].model_copy(update={"worker_id": "w-p", "prewarmed": True})
    warm = history.workers[0].model_copy(update={"worker_id": "w-w", "cold": False})
    history = dataclasses.replace(history, workers=[*history.workers, prewarmed, warm])
    assert worker_starts([history]) == {"wukong": {"cold": 2, "warm": 1, "prewarmed": 1}}


def test_prewarm_leads_are_target_start_minus_request_due():
    history = oom_run()
    trigger = history.tasks[0].model_copy(
        update={"prewarm_at": T0 + 2.5, "prewarm_targets": ["hog#0", "after#0", "gone#0"]}
    )
    history = dataclasses.replace(history, tasks=[trigger, *history.tasks[1:]])
    assert prewarm_leads([history]) == pytest.approx([2.0 - 2.5, 3.6 - 2.5])


def test_memory_wording():
    hog, after = oom_run().tasks[1:]
    assert memory_lines(hog) == [
        "class 1024 MiB, peak 700 MiB",
        "OOM-killed at 256 MiB (peak 262 MiB), re-run at 1024 MiB",
    ]
    assert memory_lines(after) == ["class 1024 MiB, peak not measured"]
    assert mib_text(None) == "-" and mib_text(512 * MIB) == "512 MiB"
    assert limits_text(oom_run().run) == (
        "memory and CPU limits enforced, 1 worker(s) OOM-killed, 1 re-run one class up"
    )
    assert limits_text(plain_run().run) == "memory and CPU limits not enforced"


def test_transfer_error_compares_each_task_with_its_own_execution_not_its_duplicate():
    history = plain_run()
    (task,) = history.tasks
    original = task.model_copy(update={"download_bytes": 1000, "download_s": 0.1})
    duplicate = original.model_copy(update={"duplicate": True, "download_s": 0.3})
    planned = TaskPlan(
        memory_mib=512, predicted_download_s=0.1, predicted_exec_s=1.0, predicted_upload_s=0.0
    )
    plan = Plan(
        planner="uniform",
        sla="avg",
        classes_mib=[512],
        memory_per_cpu_mib=1792,
        max_cpu=1.0,
        tasks={task.task_id: planned},
    )
    both = dataclasses.replace(
        history, tasks=[original, duplicate], plan_json=plan.model_dump_json()
    )
    errors = prediction_errors(both)
    assert errors["transfer"] == pytest.approx(0.0)  # 0.1 s predicted, 0.1 s measured
    assert errors["execution"] == pytest.approx(0.0)
