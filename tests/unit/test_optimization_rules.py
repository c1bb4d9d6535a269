"""Optimization planning rules, their effect in the timing model, and conflict checks."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import pytest
from pydantic import ValidationError

import dagkube
from dagkube.errors import InvalidOption
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.history import DuplicateSample, HistorySnapshot, StartupSample, TaskSample
from dagkube.planning.model import (
    Clustering,
    ClusteringParams,
    DelayedIo,
    DelayedIoParams,
    Optimization,
    Plan,
    Preload,
    PreloadParams,
    PrewarmParams,
    Taskdup,
    TaskdupParams,
)
from dagkube.planning.optimizations import (
    check_optimizations,
    split_planner,
)
from dagkube.planning.predictions import Predictor
from dagkube.planning.validation import validate_plan
from dagkube.runtime.launcher import submission_prewarms
from dagkube.runtime.scaler import prewarm_entry
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))

import large_fanin
import long_then_wide


@dagkube.task
def source() -> int:
    return 1


@dagkube.task
def grow(x: int) -> int:
    return x + 1


@dagkube.task
def gather(a: int, b: int, c: int) -> int:
    return a + b + c


def fan_in() -> dagkube.Workflow:
    s = source()
    return dagkube.Workflow(gather(grow(s), grow(s), grow(grow(s))), name="fan-in")


def options(**extra) -> PlanningOptions:
    return PlanningOptions(classes_mib=[512, 1024, 2048], **extra)


def history(samples: list[tuple[str, str, int, float]], cold_s: float = 0.3) -> HistorySnapshot:
    """Earlier runs as measured: per (task id, function, output bytes, seconds), 3 runs, every
    class; start-ups of ``cold_s`` (cold) and 5 ms (warm)."""
    tasks = [
        TaskSample(function, memory, 100, out, seconds, task_id=task_id)
        for task_id, function, out, seconds in samples
        for memory in (512, 1024, 2048)
        for _ in range(3)
    ]
    startups = [
        StartupSample(m, c, cold_s if c else 0.005)
        for m in (512, 1024, 2048)
        for c in (True, False)
    ] * 3
    return HistorySnapshot("h", 3, tasks, startups)


LARGE_FANIN = history(
    [(f"produce#{i}", "produce", 16_000_000, s) for i, s in enumerate(large_fanin.DURATIONS_S)]
    + [("merge#0", "merge", 8, 0.05)]
)
LONG_THEN_WIDE = history(
    [("prepare#0", "prepare", 100, 3.0), ("combine#0", "combine", 10, 0.001)]
    + [(f"part#{i}", "part", 10, 0.3) for i in range(long_then_wide.WIDTH)],
    cold_s=2.3,
)


def test_names_are_checked_and_put_in_composition_order():
    assert check_optimizations("prewarm, preload") == ["preload", "prewarm"]
    assert split_planner("uniform-opt") == ("uniform", ["preload", "taskdup", "prewarm"])
    assert split_planner("wukong") == ("wukong", [])
    with pytest.raises(InvalidOption, match="'warp' is unknown: choose from clustering"):
        check_optimizations("preload,warp")
    with pytest.raises(InvalidOption, match="uniform-opt"):
        plan(fan_in().dag, "fast-opt", options())


def test_opt_planner_records_its_name_and_optimizations():
    result = plan(large_fanin.build().dag, "uniform-opt", options(history=LARGE_FANIN))
    assert result.planner == "uniform-opt"
    assert result.optimizations == ["preload", "taskdup", "prewarm"]
    (entry,) = result.task_optimizations("merge#0", "preload")
    assert sorted(entry.params.inputs) == ["produce#0", "produce#1", "produce#2"]
    dups = result.task_optimizations("merge#0", "taskdup")
    assert {d.params.upstream for d in dups} == {"produce#0", "produce#1", "produce#2"}
    # With preload, the fan-in stays with its critical (longest) input's worker.
    assert entry.params.host == result.tasks["produce#3"].worker_id
    without_history = plan(large_fanin.build().dag, "uniform-opt", options())
    assert any("taskdup: off until the workflow has history" in n for n in without_history.notes)


def test_taskdup_leaves_out_upstreams_whose_earlier_duplicates_gained_nothing():
    """taskdup is not modelled: earlier duplicates are its evidence. Duplicates of produce
    that ended after their originals (a net loss) take taskdup off produce's consumers; one
    loss is not enough, and a net gain keeps it."""
    dag = large_fanin.build().dag

    def upstreams(*saved_s: float) -> tuple[set[str], list[str]]:
        found = replace(
            LARGE_FANIN,
            duplicates=[
                DuplicateSample("produce", f"produce#{i}", s) for i, s in enumerate(saved_s)
            ],
        )
        result = plan(dag, "uniform-opt", options(history=found))
        dups = result.task_optimizations("merge#0", "taskdup")
        return {d.params.upstream for d in dups}, result.notes

    every = {"produce#0", "produce#1", "produce#2"}
    assert upstreams()[0] == every
    assert upstreams(-0.4)[0] == every  # one duplicate is not evidence enough
    assert upstreams(-0.4, 0.6)[0] == every  # gained in all
    kept, notes = upstreams(-0.4, 0.1, -0.2)
    assert kept == set()
    assert (
        "taskdup: not on upstreams of produce (3 earlier duplicate(s) gained -0.500s in all)"
        in notes
    )
    assert "taskdup: no task where it applies on uniform" in notes
    # Named by the user rather than by the -opt variant, the evidence holds just the same.
    named = plan(
        dag,
        "uniform",
        options(
            history=replace(
                LARGE_FANIN, duplicates=[DuplicateSample("produce", "produce#0", -0.3)] * 2
            ),
            optimizations=["taskdup"],
        ),
    )
    assert named.task_optimizations("merge#0", "taskdup") == []


def test_prewarm_targets_the_fan_out_and_shortens_the_predicted_run():
    dag = long_then_wide.build().dag
    setting = dict(history=LONG_THEN_WIDE, max_workers=10)
    base = plan(dag, "wukong", options(**setting))
    warmed = plan(dag, "wukong", options(optimizations=["prewarm"], **setting))
    (entry,) = warmed.tasks["prepare#0"].optimizations
    assert entry.name == "prewarm" and entry.params.memory_mib == 1024
    assert entry.params.count >= 1 and entry.params.targets
    assert any(w.prewarmed and not w.cold for w in warmed.workers)
    assert warmed.model_makespan_s < base.model_makespan_s


def _with_marks(result, marks: dict[str, list[Optimization]], names: list[str]):
    result.optimizations = names
    for task_id, entries in marks.items():
        result.tasks[task_id].optimizations = entries
    return result


def test_preload_and_delayed_io_on_the_same_fan_in_are_rejected():
    dag = fan_in().dag
    result = _with_marks(
        plan(dag, "wukong", options()),
        {
            "gather#0": [
                Preload(params=PreloadParams(host="@grow#3", inputs=["grow#0", "grow#1"]))
            ],
            "grow#0": [DelayedIo(params=DelayedIoParams(fan_in="gather#0", wait_s=1))],
        },
        ["delayed-io", "preload"],
    )
    with pytest.raises(InvalidOption) as info:
        validate_plan(dag, result)
    message = str(info.value)
    assert "Task 'gather#0'" in message
    assert "'preload' and 'delayed-io' conflict" in message and "'grow#0'" in message


def test_two_delayed_inputs_of_one_fan_in_are_rejected():
    dag = fan_in().dag
    delayed = DelayedIoParams(fan_in="gather#0", wait_s=1)
    result = _with_marks(
        plan(dag, "wukong", options()),
        {
            "grow#0": [DelayedIo(params=delayed)],
            "grow#1": [DelayedIo(params=delayed)],
        },
        ["delayed-io"],
    )
    with pytest.raises(InvalidOption, match="'delayed-io' on its inputs 'grow#0' and 'grow#1'"):
        validate_plan(dag, result)


def test_taskdup_of_an_upstream_whose_input_clustering_keeps_local_is_rejected():
    dag = fan_in().dag
    result = plan(dag, "uniform", options())
    for task in result.tasks.values():  # a plan editor's mix: flexible fan-out, bound fan-in
        task.worker_id = None
    result.tasks["gather#0"].worker_id = "w0"
    result = _with_marks(
        result,
        {
            "source#0": [
                Clustering(params=ClusteringParams(children=["grow#0", "grow#1", "grow#2"]))
            ],
            "gather#0": [
                Taskdup(
                    params=TaskdupParams(
                        upstream="grow#0", exec_s=0.1, original_end_s=1, original_exec_s=0.1
                    )
                )
            ],
        },
        ["clustering", "taskdup"],
    )
    with pytest.raises(InvalidOption, match="'taskdup' and 'clustering' conflict"):
        validate_plan(dag, result)


def test_marks_must_be_switched_on_and_name_real_tasks():
    dag = fan_in().dag
    result = plan(dag, "wukong", options())
    result.tasks["grow#0"].optimizations = [
        DelayedIo(params=DelayedIoParams(fan_in="gather#0", wait_s=1))
    ]
    with pytest.raises(InvalidOption, match="'delayed-io' is not switched on"):
        validate_plan(dag, result)
    result.optimizations = ["delayed-io"]
    result.tasks["grow#0"].optimizations[0].params.fan_in = "nope#9"
    with pytest.raises(InvalidOption, match="names task 'nope#9'"):
        validate_plan(dag, result)


# A plan as the previous release stored it in Redis and the history (parameters were a free
# dict then): it must still parse, into typed parameters, and keep its JSON shape.
STORED_PLAN = {
    "planner": "wukong-opt",
    "sla": "avg",
    "classes_mib": [512, 1024],
    "memory_per_cpu_mib": 1024,
    "max_cpu": 2.0,
    "tasks": {
        "split#0": {
            "memory_mib": 512,
            "worker_id": None,
            "optimizations": [
                {"name": "clustering", "params": {"children": ["square#0", "square#1"]}},
                {
                    "name": "prewarm",
                    "params": {
                        "memory_mib": 512,
                        "count": 2,
                        "delay_s": 0.25,
                        "targets": ["total#0"],
                    },
                },
            ],
            "predicted_start_s": 0.0,
            "predicted_end_s": 0.3,
            "predicted_download_s": 0.0,
            "predicted_exec_s": 0.2,
            "predicted_upload_s": 0.1,
            "critical_path": True,
        },
        "square#0": {
            "memory_mib": 512,
            "worker_id": "w0",
            "optimizations": [
                {"name": "delayed-io", "params": {"fan_in": "total#0", "wait_s": 0.4}}
            ],
            "predicted_start_s": None,
            "predicted_end_s": None,
            "predicted_download_s": None,
            "predicted_exec_s": None,
            "predicted_upload_s": None,
            "critical_path": False,
        },
        "total#0": {
            "memory_mib": 512,
            "worker_id": "w1",
            "optimizations": [
                {"name": "preload", "params": {"host": "w1", "inputs": ["square#0"]}},
                {
                    "name": "taskdup",
                    "params": {
                        "upstream": "square#0",
                        "exec_s": 0.12,
                        "original_end_s": 1.5,
                        "original_exec_s": 0.1,
                    },
                },
            ],
            "predicted_start_s": None,
            "predicted_end_s": None,
            "predicted_download_s": None,
            "predicted_exec_s": None,
            "predicted_upload_s": None,
            "critical_path": False,
        },
    },
    "workers": [],
    "predicted_makespan_s": 1.9,
    "model_makespan_s": 1.8,
    "predicted_gb_s": 0.5,
    "history_runs": 3,
    "history_samples": 40,
    "optimizations": ["clustering", "delayed-io", "preload", "taskdup", "prewarm"],
    "notes": [],
}


def test_a_stored_plan_parses_into_typed_parameters_and_keeps_its_json_shape():
    parsed = Plan.model_validate_json(json.dumps(STORED_PLAN))
    clustering, prewarm = parsed.tasks["split#0"].optimizations
    assert isinstance(clustering.params, ClusteringParams)
    assert clustering.params.children == ["square#0", "square#1"]
    assert isinstance(prewarm.params, PrewarmParams)
    assert (prewarm.params.memory_mib, prewarm.params.count) == (512, 2)
    (delayed,) = parsed.tasks["square#0"].optimizations
    assert isinstance(delayed.params, DelayedIoParams) and delayed.params.wait_s == 0.4
    preload, dup = parsed.tasks["total#0"].optimizations
    assert isinstance(preload.params, PreloadParams) and preload.params.host == "w1"
    assert isinstance(dup.params, TaskdupParams) and dup.params.original_end_s == 1.5
    # a plan stored before objectives, output-size predictions and the source order gets
    # their defaults (its sources queued in the DAG's order, as they were)
    expected = {
        **STORED_PLAN,
        "objective": "makespan",
        "max_gb_s": None,
        "alternatives": [],
        "longest_first": False,
    }
    expected["tasks"] = {
        task_id: {**task, "predicted_output_bytes": None}
        for task_id, task in STORED_PLAN["tasks"].items()
    }
    assert json.loads(parsed.model_dump_json()) == expected


@pytest.mark.parametrize(
    ("task_id", "mark", "expected"),
    [
        (
            "square#0",
            {"name": "delayed-io", "params": {"fan_in": "total#0"}},
            r"optimizations\.0\.delayed-io\.params\.wait_s\n  Field required",
        ),
        (
            "total#0",
            {"name": "preload", "params": {"hots": "w1", "inputs": ["square#0"]}},
            r"preload\.params\.hots\n  Extra inputs are not permitted",
        ),
        (
            "split#0",
            {
                "name": "prewarm",
                "params": {"memory_mib": 512, "count": "two", "delay_s": 0, "targets": []},
            },
            r"prewarm\.params\.count\n  Input should be a valid integer",
        ),
        (
            "split#0",
            {"name": "turbo", "params": {}},
            r"tag 'turbo' .* does not match any of the expected tags: 'clustering'",
        ),
    ],
)
def test_a_plan_with_a_wrong_or_missing_parameter_is_refused_when_parsed(task_id, mark, expected):
    stored = json.loads(json.dumps(STORED_PLAN))
    stored["tasks"][task_id]["optimizations"] = [mark]
    with pytest.raises(ValidationError, match=expected):
        Plan.model_validate_json(json.dumps(stored))


def _long_then_wide_cold(cold_s: list[float]) -> HistorySnapshot:
    """LONG_THEN_WIDE's task samples with these cold start-ups (every class; warm 5 ms)."""
    startups = [StartupSample(m, True, s) for m in (512, 1024, 2048) for s in cold_s]
    startups += [StartupSample(m, False, 0.005) for m in (512, 1024, 2048)] * 3
    return HistorySnapshot("h", 3, LONG_THEN_WIDE.tasks, startups)


@pytest.mark.parametrize("sla", ["avg", "p90"])
def test_prewarm_is_due_the_predicted_start_up_at_the_sla_before_the_fan_out_is_queued(sla):
    """The request hangs on prepare, whose completion queues the fan-out: due when prepare's
    predicted time less the cold start-up at the plan's SLA (and the small margin) is over,
    so the pre-warmed workers are predicted to wait for work no longer than that margin."""
    history = _long_then_wide_cold([1.6, 1.8, 2.0, 2.2, 2.6])
    setting = dict(history=history, max_workers=10, sla=sla)
    warmed = plan(
        long_then_wide.build().dag, "wukong", options(optimizations=["prewarm"], **setting)
    )
    startup = Predictor(history, sla).startup_s(1024, True)
    mean = Predictor(history, "avg").startup_s(1024, True)
    assert startup == pytest.approx(2.04) if sla == "avg" else startup > mean + 0.3
    (entry,) = warmed.tasks["prepare#0"].optimizations
    prepare = warmed.tasks["prepare#0"]
    assert prepare.predicted_start_s is not None and prepare.predicted_end_s is not None
    queued = prepare.predicted_end_s  # its completion queues the other parts
    expected = queued - startup - prepare.predicted_start_s
    assert entry.params.delay_s == pytest.approx(expected, abs=1e-5)
    assert entry.params.count == long_then_wide.WIDTH - 1  # prepare's worker continues itself
    prewarmed = [w for w in warmed.workers if w.prewarmed]
    assert len(prewarmed) == entry.params.count
    for worker in prewarmed:  # queued -> taken: the pre-warmed worker was waiting, ready
        assert worker.predicted_startup_s is not None and worker.predicted_startup_s <= 0.01
        assert worker.predicted_start_s == pytest.approx(queued - startup)


def test_prewarm_due_before_its_trigger_starts_is_sent_by_the_driver_at_submission():
    """A cold start-up longer than prepare: the fan-out's workers must be spawned before
    prepare's own worker is up, so the request on prepare gets a negative delay; the driver
    sends it at submission, due at prepare's predicted start plus that delay (never before
    the run's start), and the pre-warmed workers are still predicted ready just in time."""
    history = _long_then_wide_cold([4.0, 4.2, 4.4])
    warmed = plan(
        long_then_wide.build().dag,
        "wukong",
        options(optimizations=["prewarm"], history=history, max_workers=10),
    )
    startup = Predictor(history, "avg").startup_s(1024, True)
    prepare = warmed.tasks["prepare#0"]
    (entry,) = prepare.optimizations
    assert prepare.predicted_start_s is not None and prepare.predicted_end_s is not None
    due_s = prepare.predicted_end_s - startup
    assert 0 < due_s < prepare.predicted_start_s
    assert entry.params.delay_s == pytest.approx(due_s - prepare.predicted_start_s, abs=1e-5)
    for worker in (w for w in warmed.workers if w.prewarmed):
        assert worker.predicted_startup_s is not None and worker.predicted_startup_s <= 0.01
    sent = submission_prewarms(warmed, "run-1", now=1000.0)
    member = prewarm_entry("run-1", 1024, long_then_wide.WIDTH - 1, "prepare#0")
    assert sent == {member: pytest.approx(1000.0 + due_s, abs=1e-5)}
    assert json.loads(member) == {
        "run": "run-1",
        "mem": 1024,
        "count": long_then_wide.WIDTH - 1,
        "trigger": "prepare#0",
    }


def test_prewarm_due_after_its_trigger_starts_is_left_to_the_trigger():
    """A start-up shorter than prepare: the request is due while prepare runs, so prepare's
    worker sends it (a positive delay) and the driver sends nothing at submission; a delay
    that would fall before the run's start is due at submission, not earlier."""
    warmed = plan(
        long_then_wide.build().dag,
        "wukong",
        options(
            optimizations=["prewarm"], history=_long_then_wide_cold([1.8, 2.0]), max_workers=10
        ),
    )
    (entry,) = warmed.tasks["prepare#0"].optimizations
    assert entry.params.delay_s > 0
    assert submission_prewarms(warmed, "run-1", now=1000.0) == {}
    entry.params.delay_s = -100.0
    assert list(submission_prewarms(warmed, "run-1", now=1000.0).values()) == [1000.0]


def test_prewarm_is_anchored_on_the_chain_that_queues_its_targets():
    """An unrelated task that starts later (but before the request is due) does not anchor
    it: the chain that makes the targets ready does, so its predicted time times the request."""

    @dagkube.task
    def prepare() -> list[int]:
        return [0]

    @dagkube.task
    def side() -> int:
        return 1

    @dagkube.task
    def part(items: list[int], index: int, extra: int) -> int:
        return index

    @dagkube.task
    def combine(parts: list[int]) -> int:
        return sum(parts)

    items, extra = prepare(), side()
    wf = dagkube.Workflow(combine([part(items, i, 0) for i in range(4)] + [extra]), name="anchor")
    samples = [("prepare#0", "prepare", 100, 3.0), ("side#0", "side", 8, 0.2)]
    samples += [(f"part#{i}", "part", 8, 0.3) for i in range(4)] + [
        ("combine#0", "combine", 8, 0.01)
    ]
    found = plan(
        wf.dag,
        "wukong",
        options(history=history(samples, cold_s=1.0), max_workers=10, optimizations=["prewarm"]),
    )
    marked = {t: p.optimizations for t, p in found.tasks.items() if p.optimizations}
    assert list(marked) == ["prepare#0"], marked
