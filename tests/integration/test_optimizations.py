"""Optimizations on the real runtime: each hook fires, records what it did, and the results
are those of a run without it. Plans are made by the planners, then marked by hand where a
test needs a mark the planner would only make from a longer history."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import redis

import dagkube
from dagkube.metrics.history import load_snapshot, read_run
from dagkube.planning.model import (
    Clustering,
    ClusteringParams,
    DelayedIo,
    DelayedIoParams,
    Preload,
    PreloadParams,
    Prewarm,
    PrewarmParams,
    Taskdup,
    TaskdupParams,
)
from dagkube.planning.validation import validate_plan
from dagkube.store.keys import PoolKeys
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


@dagkube.task
def make_block(index: int, seconds: float) -> bytes:
    time.sleep(seconds)
    return bytes([index]) * 2_000_000


@dagkube.task
def checksum(blocks: list[bytes]) -> list[int]:
    return [len(b) * b[0] for b in blocks]


@dagkube.task
def slow_once(marker: str, seconds: float) -> str:
    """Stalls on its first execution in a test (like a request that hangs), fast after."""
    path = Path(marker)
    if not path.exists():
        path.write_text("ran")
        time.sleep(seconds)
    return "reference"


@dagkube.task
def long_step(seconds: float) -> int:
    time.sleep(seconds)
    return 6


@dagkube.task
def combine_pair(number: int, text: str) -> str:
    return f"{text}:{number}"


@dagkube.task
def split(count: int) -> list[int]:
    return list(range(count))


@dagkube.task
def square(items: list[int], index: int) -> int:
    return items[index] ** 2


@dagkube.task
def slow_split(count: int, seconds: float) -> list[int]:
    time.sleep(seconds)
    return list(range(count))


@dagkube.task
def slow_square(items: list[int], index: int, seconds: float) -> int:
    time.sleep(seconds)
    return items[index] ** 2


@dagkube.task
def total(values: list[int]) -> int:
    return sum(values)


@dagkube.task
def split_when_idle(count: int, redis_url: str, idle_key: str, idle: int) -> list[int]:
    """Returns once ``idle`` workers wait in ``idle_key``: the demand it queues comes only
    when the pre-warmed workers are ready (a bounded wait, so a bug fails rather than hangs)."""
    client = redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 60
        while client.scard(idle_key) < idle:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{idle} idle worker(s) never appeared in {idle_key}")
            time.sleep(0.02)
    finally:
        client.close()
    return list(range(count))


def blocks_workflow() -> dagkube.Workflow:
    blocks = [make_block(i, s) for i, s in enumerate([0.05, 0.1, 0.15, 0.8])]
    return dagkube.Workflow(checksum(blocks), name="opt-blocks")


def history_of(rt, run_id: str):
    found = rt.call(read_run(rt.redis, run_id))
    assert found is not None
    return found


def test_preload_fetches_fan_in_inputs_in_the_background(make_runtime):
    rt = make_runtime(max_workers=4)
    wf = blocks_workflow()
    for _ in range(3):  # history: which producer is long (per task), outputs are large
        wf.run("uniform", "avg", "1Gi", runtime=rt)
    planned = wf.plan("uniform", "avg", "1Gi", runtime=rt, optimizations=["preload"])
    (entry,) = planned.task_optimizations("checksum#0", "preload")
    assert entry.params.host == planned.tasks["make_block#3"].worker_id
    result = rt.run(wf.dag, planned)
    assert result.outputs == [0, 2_000_000, 4_000_000, 6_000_000]
    merge = {t.task_id: t for t in history_of(rt, result.run_id).tasks}["checksum#0"]
    # The short producers of other workers finished while the long one ran on the fan-in's
    # worker: they were fetched in the background (one may have run in the same process,
    # which then holds it already), so nothing was left to fetch when the fan-in started.
    assert merge.preloaded and set(merge.preloaded) <= set(entry.params.inputs)
    assert merge.preload_s > 0
    assert merge.download_bytes == 0


def _fan_out(split_task: Any, *args: Any, width: int = 3) -> dagkube.Workflow:
    items = split_task(width, *args)
    return dagkube.Workflow(
        total([slow_square(items, i, 0.3) for i in range(width)]), name="opt-prewarm"
    )


def _prewarm_mark(
    planned: Any, trigger: str, count: int, delay_s: float, memory_mib: int = 512
) -> None:
    planned.optimizations = ["prewarm"]
    targets = [f"slow_square#{i}" for i in range(1, count + 1)]
    params = PrewarmParams(memory_mib=memory_mib, count=count, delay_s=delay_s, targets=targets)
    planned.tasks[trigger].optimizations = [Prewarm(params=params)]


def test_prewarm_request_creates_workers_that_serve_the_fan_out(make_runtime, redis_server):
    """The request is due ``delay_s`` after the trigger's start; the scaler creates the
    workers then, and they serve the fan-out. The trigger returns only once both pre-warmed
    workers wait idle, so the fan-out never races their start-up, however slow it is."""
    rt = make_runtime(max_workers=6, startup_delay_s=0.5)
    idle_key = PoolKeys(rt.pool).idle(512)
    wf = _fan_out(split_when_idle, redis_server.url, idle_key, 2)
    planned = wf.plan("wukong", "avg", "512Mi", runtime=rt)
    _prewarm_mark(planned, "split_when_idle#0", count=2, delay_s=0.3)
    result = rt.run(wf.dag, planned)
    assert result.outputs == 0 + 1 + 4
    found = history_of(rt, result.run_id)
    assert found.run.prewarm_requested == 2 and found.run.prewarm_started == 2
    trigger = {t.task_id: t for t in found.tasks}["split_when_idle#0"]
    assert trigger.prewarm_at is not None
    assert trigger.prewarm_targets == ["slow_square#1", "slow_square#2"]
    assert trigger.ready_at + 0.3 <= trigger.prewarm_at + 1e-3  # due delay_s after its start
    assert trigger.prewarm_at <= trigger.started_at + 0.3
    prewarmed = [w for w in found.workers if w.prewarmed]
    assert found.run.workers_prewarmed == len(prewarmed) == 2
    for worker in prewarmed:
        assert not worker.cold and worker.spawned_at is not None
        assert worker.spawned_at >= trigger.prewarm_at - 0.01  # created when due, not before
        assert worker.ready_at is not None and worker.ready_at >= trigger.ended_at
    # The history learns their start-up (spawn to ready for work) as a cold one: what the
    # next plan's pre-warm is timed from.
    snapshot = rt.call(load_snapshot(rt.redis, wf.structure_hash))
    cold = [s.startup_s for s in snapshot.startups if s.cold]
    for worker in prewarmed:
        assert worker.registered_at is not None and worker.spawned_at is not None
        ready_s = worker.registered_at - worker.spawned_at
        assert ready_s >= 0.5  # the start-up delay
        assert any(abs(ready_s - sample) < 1e-6 for sample in cold), (ready_s, cold)


def test_prewarm_due_before_its_trigger_starts_is_sent_at_submission(make_runtime):
    """A request due before its trigger can start (negative delay: the trigger's worker is
    still starting) is sent by the driver at submission: the scaler creates the workers
    while the first worker starts, and the trigger's own copy of the request, sent when it
    starts, creates nothing more."""
    rt = make_runtime(max_workers=6, startup_delay_s=1.0)
    wf = _fan_out(slow_split, 1.0)
    planned = wf.plan("wukong", "avg", "512Mi", runtime=rt)
    trigger = "slow_split#0"
    planned.tasks[trigger].predicted_start_s = 1.0
    _prewarm_mark(planned, trigger, count=2, delay_s=-1.0)  # due at submission
    result = rt.run(wf.dag, planned)
    assert result.outputs == 0 + 1 + 4
    found = history_of(rt, result.run_id)
    assert found.run.prewarm_requested == 2 and found.run.prewarm_started == 2
    started = {t.task_id: t for t in found.tasks}[trigger]
    assert started.prewarm_at is not None and started.prewarm_at <= started.ready_at
    spawned = sorted(rt.backend.spawned_ids)
    assert len(spawned) == 3  # the first worker and the two pre-warmed: none again
    prewarmed = [w for w in found.workers if w.prewarmed]
    for worker in prewarmed:
        assert worker.spawned_at is not None and worker.spawned_at < started.ready_at
    assert found.run.workers_prewarmed >= 1


def test_unused_prewarmed_workers_exit_early_and_warm_ones_stay(make_runtime):
    """Pre-warmed workers no demand came for (a class nothing of the run queues) exit soon
    after their targets were taken, not after the idle timeout, charged to the run as
    wasted; the workers that served the run stay idle for the next one."""
    rt = make_runtime(max_workers=6, idle_timeout_s=120)
    wf = _fan_out(slow_split, 0.5)
    planned = wf.plan("wukong", "avg", "512Mi", runtime=rt)
    _prewarm_mark(planned, "slow_split#0", count=2, delay_s=0.0, memory_mib=1024)
    result = rt.run(wf.dag, planned)
    assert result.outputs == 0 + 1 + 4

    def by_class(memory_mib: int) -> list[str]:
        assert rt.backend is not None
        return [h.worker_id for h in rt.backend.alive() if h.memory_mib == memory_mib]

    wait_until(lambda: not by_class(1024), 30, message="the unused pre-warmed workers gone")

    def charged() -> Any:
        record = rt.run_record(result.run_id)
        return record if record is not None and record.prewarm_wasted == 2 else None

    record = wait_until(charged, message="the unused pre-warmed workers charged to the run")
    assert record.prewarm_started == 2 and record.workers_prewarmed == 0
    assert record.prewarm_wasted_gb_s > 0
    # The workers that served stay warm (idle timeout 120 s), waiting for the next run.
    idle_key = PoolKeys(rt.pool).idle(512)
    warm = wait_until(
        lambda: len(by_class(512)) == rt.call(rt.redis.scard(idle_key)) and by_class(512),
        message="the workers that served idle",
    )
    assert len(warm) >= 1


def test_prewarm_is_not_started_for_demand_idle_workers_will_take(make_runtime):
    """Idle workers of the class (a previous run's) will take the fan-out warm: the request
    falls due while the trigger runs, and the scaler starts nothing for it."""
    rt = make_runtime(max_workers=6)
    wf = _fan_out(slow_split, 1.5)
    rt.run(wf.dag, wf.plan("wukong", "avg", "512Mi", runtime=rt))  # leaves 3 workers idle
    idle_key = PoolKeys(rt.pool).idle(512)
    wait_until(lambda: rt.call(rt.redis.scard(idle_key)) >= 3, message="3 idle workers")
    spawned = list(rt.backend.spawned_ids)
    planned = wf.plan("wukong", "avg", "512Mi", runtime=rt)
    _prewarm_mark(planned, "slow_split#0", count=2, delay_s=0.0)
    result = rt.run(wf.dag, planned)
    assert result.outputs == 0 + 1 + 4
    found = history_of(rt, result.run_id)
    assert found.run.prewarm_requested == 2 and found.run.prewarm_started == 0
    assert found.run.workers_cold == 0 and found.run.workers_prewarmed == 0
    assert rt.backend.spawned_ids == spawned


def test_prewarm_requests_of_an_ended_run_are_dropped_unstarted(make_runtime):
    """A request of a run that ended (here added after its end, as a late trigger would) is
    removed at once, due or not, and no worker is created for it; the run's record counts
    the workers requested and none started."""
    rt = make_runtime(max_workers=4)
    wf = _fan_out(slow_split, 0.0)
    result = rt.run(wf.dag, wf.plan("wukong", "avg", "512Mi", runtime=rt))
    spawned = list(rt.backend.spawned_ids)
    pool = PoolKeys(rt.pool)
    now = time.time()
    requests = {
        json.dumps({"run": result.run_id, "mem": 512, "count": count, "trigger": "slow_split#0"}): (
            due
        )
        for count, due in ((1, now), (2, now + 600))
    }
    rt.call(rt.redis.zadd(pool.prewarm, requests))
    rt.call(rt.redis.lpush(pool.wake, "1"))
    wait_until(lambda: rt.call(rt.redis.zcard(pool.prewarm)) == 0, message="requests dropped")

    def counted() -> Any:
        record = rt.run_record(result.run_id)
        return record if record is not None and record.prewarm_requested == 3 else None

    record = wait_until(counted, message="the requests counted in the run's record")
    assert record.prewarm_started == 0
    assert rt.backend.spawned_ids == spawned


def test_taskdup_reruns_a_stalled_upstream_and_keeps_the_result(make_runtime, tmp_path):
    rt = make_runtime(max_workers=4)
    marker = tmp_path / "stalled"

    def build(path: Path) -> dagkube.Workflow:
        # The consumer's own upstream takes 1 s: by the time it looks for slow_once (and
        # duplicates it), the original has started and stalls, even when its worker is slow to
        # start (under load, a duplicate fired earlier once ran first and stalled instead).
        return dagkube.Workflow(
            combine_pair(long_step(1.0), slow_once(str(path), 4.0)), name="opt-straggler"
        )

    wf = build(marker)
    planned = wf.plan("uniform", "p50", "1Gi", runtime=rt)
    consumer = planned.tasks["combine_pair#0"]
    assert consumer.worker_id == planned.tasks["long_step#0"].worker_id
    assert planned.tasks["slow_once#0"].worker_id != consumer.worker_id
    planned.optimizations = ["taskdup"]
    consumer.optimizations = [
        Taskdup(
            params=TaskdupParams(
                upstream="slow_once#0", exec_s=0.05, original_end_s=0.2, original_exec_s=0.1
            )
        )
    ]
    started = time.monotonic()
    result = rt.run(wf.dag, planned)
    assert result.outputs == "reference:6"
    found = history_of(rt, result.run_id)
    assert found.run.tasks_duplicated == 1 and found.run.duplicates_won == 1
    copies = [t for t in found.tasks if t.task_id == "slow_once#0"]
    assert sorted(t.duplicate for t in copies) == [False, True]
    duplicate = next(t for t in copies if t.duplicate)
    assert duplicate.logical_worker == consumer.worker_id
    analyzed = next(t for t in found.tasks if t.task_id == "combine_pair#0")
    assert analyzed.duplicated == ["slow_once#0"]
    # The outputs existed long before the stalled original ended (its worker was still
    # charged until then): the makespan ends at the last completion, not at the original's
    # end (it stalls 4 s; measured from the submission, so slow cold starts do not matter).
    original = next(t for t in copies if not t.duplicate)
    original_end_s = original.ended_at - found.run.submitted_at
    assert found.run.makespan_s is not None
    assert found.run.makespan_s < original_end_s - 1.0, (found.run.makespan_s, original_end_s)
    assert time.monotonic() - started >= 4.0  # the run finalizes when the original ends
    # What the duplicate gained is the planner's evidence for taskdup on slow_once next time.
    snapshot = rt.call(load_snapshot(rt.redis, wf.structure_hash))
    (sample,) = snapshot.duplicates
    assert (sample.task_id, sample.function) == ("slow_once#0", original.function)
    assert sample.saved_s == pytest.approx(original.ended_at - duplicate.ended_at, abs=1e-5)
    assert sample.saved_s > 1.0


def test_clustering_and_delayed_io_keep_outputs_local(make_runtime):
    rt = make_runtime(max_workers=4)
    items = split(3)
    squares = [square(items, i) for i in range(3)]
    wf = dagkube.Workflow(total(squares), name="opt-cluster")
    planned = wf.plan("wukong", "avg", "512Mi", runtime=rt)
    planned.optimizations = ["clustering", "delayed-io"]
    planned.tasks["split#0"].optimizations = [
        Clustering(params=ClusteringParams(children=[f"square#{i}" for i in range(3)]))
    ]
    planned.tasks["square#2"].optimizations = [
        DelayedIo(params=DelayedIoParams(fan_in="total#0", wait_s=5.0))
    ]
    result = rt.run(wf.dag, planned)
    assert result.outputs == 0 + 1 + 4
    found = history_of(rt, result.run_id)
    tasks = {t.task_id: t for t in found.tasks}
    workers = {t.worker_id for t in tasks.values()}
    assert len(workers) == 1  # the fan-out's children and the fan-in ran where split ran
    assert not tasks["split#0"].output_stored
    assert tasks["square#2"].delayed_io == "kept" and not tasks["square#2"].output_stored


@dagkube.task
def add_pair(a: int, b: int) -> int:
    return a + b


@pytest.mark.parametrize("delayed_io", [False, True])
def test_flexible_preload_runs_a_tree_reduction_to_the_end(make_runtime, delayed_io):
    """A wukong plan's fan-ins are pre-loaded by the worker running their last input
    (host ``@<task>``): every such task starts a pre-loader and its invocation stops them all,
    however soon after they started. A stop that did not take once left the invocation (and
    the run) waiting forever. The marks are set by hand, as the preload rule sets them on
    flexible fan-ins, on every fan-in: the planner applies preload only where the timing
    model predicts it helps, which small sums are not."""
    rt = make_runtime(max_workers=4)
    values = list(range(48))
    wf = dagkube.Workflow(dagkube.reduce_tree(values, add_pair), name="opt-flexible-preload")
    wf.run("wukong", "avg", "1Gi", runtime=rt)  # history: the tasks' times
    for _ in range(3):
        planned = rt.plan(wf.dag, "wukong", classes="1Gi")
        for task_id, spec in wf.dag.tasks.items():
            if len(spec.deps) < 2:
                continue
            last = max(spec.deps, key=lambda d: planned.tasks[d].predicted_end_s or 0.0)
            others = [d for d in spec.deps if d != last]
            planned.tasks[task_id].optimizations.append(
                Preload(params=PreloadParams(host="@" + last, inputs=others))
            )
            if delayed_io:
                planned.tasks[last].optimizations.append(
                    DelayedIo(params=DelayedIoParams(fan_in=task_id, wait_s=0.05))
                )
        planned.optimizations = ["delayed-io", "preload"] if delayed_io else ["preload"]
        validate_plan(wf.dag, planned)
        result = rt.run(wf.dag, planned, timeout_s=30)
        assert result.status == "succeeded"
        assert result.outputs == sum(values)
