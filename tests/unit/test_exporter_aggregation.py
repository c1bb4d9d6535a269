"""The exporter's aggregation on records built by hand (no Redis, no prometheus_client): what
one folded run adds to each counter and histogram, and how stored plans and starts are read."""

from __future__ import annotations

import dataclasses
import json

import pytest

from dagkube.metrics.aggregation import Histogram, Totals, plan_marks, start_kind
from dagkube.metrics.catalogue import HISTORY_SPECS, MEMORY_BYTES, RATIOS
from dagkube.metrics.history import RunHistory
from tests.history_records import MIB, T0, oom_run

RUN = ("mem-demo", "wukong", "avg")


def _fold(*histories: RunHistory, marks: dict[str, int] | None = None) -> Totals:
    totals = Totals()
    for history in histories:
        totals.fold(history.run, history.tasks, history.workers, marks or {})
    return totals


def _bucket(bounds: tuple[float, ...], value: float) -> int:
    """Index of the first bound at or above ``value`` (len(bounds): +Inf)."""
    return next((i for i, bound in enumerate(bounds) if value <= bound), len(bounds))


def test_every_history_metric_has_a_total():
    totals = Totals()
    counters = {s.name for s in HISTORY_SPECS if s.kind == "counter"}
    histograms = {s.name for s in HISTORY_SPECS if s.kind == "histogram"}
    assert set(totals.counters) == counters and set(totals.histograms) == histograms


def test_a_run_is_counted_by_status_and_sla_outcome_with_siblings_at_zero():
    counters = _fold(oom_run()).counters
    assert counters["dagkube_runs"] == {(*RUN, "succeeded"): 1.0, (*RUN, "failed"): 0.0}
    # Measured 4.0 s against a predicted 3.5 s: missed.
    assert counters["dagkube_run_sla"] == {(*RUN, "met"): 0.0, (*RUN, "missed"): 1.0}
    assert counters["dagkube_workers_oom_killed"][RUN] == 1.0
    assert counters["dagkube_oom_escalations"][RUN] == 1.0


def test_run_histograms_hold_the_makespan_error_and_execution():
    histograms = _fold(oom_run(), oom_run()).histograms
    error = histograms["dagkube_run_prediction_error_ratio"]
    assert error.sums[RUN] == pytest.approx(2 * 0.125)
    counts = [0] * (len(RATIOS) + 1)
    counts[_bucket(RATIOS, 0.125)] = 2
    assert error.counts[RUN] == counts
    assert histograms["dagkube_run_makespan_seconds"].sums[RUN] == pytest.approx(8.0)
    assert histograms["dagkube_run_execution_seconds"].sums[RUN] == pytest.approx(2 * 2.7)
    assert histograms["dagkube_run_gigabyte_seconds"].sums[RUN] == pytest.approx(2 * 3.25)


def test_tasks_are_counted_per_function():
    totals = _fold(oom_run())
    hog = ("mem-demo", "wukong", "hog")
    assert totals.counters["dagkube_task_oom_kills"][hog] == 1.0
    assert totals.counters["dagkube_task_oom_kills"][("mem-demo", "wukong", "load")] == 0.0
    peaks = totals.histograms["dagkube_task_peak_memory_bytes"]
    assert peaks.sums[hog] == 700 * MIB
    assert peaks.counts[hog][_bucket(MEMORY_BYTES, 700 * MIB)] == 1
    assert ("mem-demo", "wukong", "after") not in peaks.counts  # not measured: not observed
    durations = totals.histograms["dagkube_task_duration_seconds"]
    assert durations.sums[hog] == pytest.approx(1.5)


def test_workers_are_charged_from_spawn_when_cold_and_counted_by_start():
    history = oom_run()
    w_a, w_b, w_c = history.workers
    w_c = w_c.model_copy(update={"spawned_at": T0 + 1.6, "cpu": 0.5})  # cold: from its spawn
    warm = w_a.model_copy(
        update={"worker_id": "w-w", "cold": False, "ready_at": T0 + 0.6, "spawned_at": T0}
    )
    totals = _fold(dataclasses.replace(history, workers=[w_a, w_b, w_c, warm]))
    counters = totals.counters
    assert counters["dagkube_workers_lost"] == {("wukong", "256Mi"): 1.0}
    assert counters["dagkube_worker_starts"] == {
        ("wukong", "256Mi", "cold"): 1.0,
        ("wukong", "256Mi", "warm"): 1.0,
        ("wukong", "256Mi", "prewarmed"): 0.0,
        ("wukong", "1Gi", "cold"): 1.0,
        ("wukong", "1Gi", "warm"): 0.0,
        ("wukong", "1Gi", "prewarmed"): 0.0,
    }
    # 256Mi: the lost worker from its spawn (0.9 s), w-a without a spawn time (nothing), the
    # warm one from taking its invocation (1.1 - 0.6 s), not from its spawn.
    assert counters["dagkube_gigabyte_seconds"][("wukong", "256Mi")] == pytest.approx(
        (0.9 + 0.5) * 0.25
    )
    assert counters["dagkube_gigabyte_seconds"][("wukong", "1Gi")] == pytest.approx(2.5)
    assert counters["dagkube_cpu_seconds_allocated"][("wukong", "1Gi")] == pytest.approx(1.25)


def test_duplicates_and_prewarm_targets():
    history = oom_run()
    load, hog, after = history.tasks
    trigger = load.model_copy(
        update={"prewarm_at": T0 + 2.5, "prewarm_targets": ["hog#0", "after#0"]}
    )
    duplicate = hog.model_copy(update={"duplicate": True, "ended_at": T0 + 3.0})
    run = history.run.model_copy(update={"optimizations": ["taskdup"]})
    totals = _fold(
        dataclasses.replace(history, run=run, tasks=[trigger, hog, duplicate, after]),
        marks={"taskdup": 3},
    )
    label = "wukong + taskdup"
    run_labels = ("mem-demo", label, "avg")
    assert totals.counters["dagkube_taskdup_saved_seconds"][run_labels] == pytest.approx(0.5)
    # hog#0 started 0.5 s before its request was due, after#0 1.1 s after.
    assert totals.counters["dagkube_prewarm_targets"] == {
        (label, "ahead"): 1.0,
        (label, "late"): 1.0,
    }
    lead = totals.histograms["dagkube_prewarm_trigger_to_start_seconds"]
    assert lead.sums[(label,)] == pytest.approx(1.1)
    assert totals.counters["dagkube_optimizations_applied"] == {(label, "taskdup"): 1.0}
    assert totals.histograms["dagkube_run_optimization_marks"].sums[
        ("mem-demo", label, "taskdup")
    ] == pytest.approx(3)


def test_histogram_bounds_are_inclusive_and_the_last_bucket_is_inf():
    histogram = Histogram(buckets=(1, 5))
    for value in (0.5, 1, 1.01, 5, 7):
        histogram.observe(("x",), value)
    assert histogram.counts[("x",)] == [2, 2, 1]
    assert histogram.sums[("x",)] == pytest.approx(14.51)


def test_plan_marks_count_each_optimization_of_a_stored_plan():
    plan = {
        "tasks": {
            "a": {"optimizations": [{"name": "preload"}, {"name": "taskdup"}]},
            "b": {"optimizations": [{"name": "preload"}]},
            "c": {},
        }
    }
    assert plan_marks(json.dumps(plan).encode()) == {"preload": 2, "taskdup": 1}
    assert plan_marks(None) == {}
    assert plan_marks(b"{not json") == {}


def test_start_kind():
    worker = oom_run().workers[0]
    assert start_kind(worker) == "cold"
    assert start_kind(worker.model_copy(update={"cold": False})) == "warm"
    assert start_kind(worker.model_copy(update={"prewarmed": True})) == "prewarmed"
