"""End-to-end runs on a real Redis with real worker processes."""

from __future__ import annotations

import itertools
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import dagkube
from dagkube.planning.model import Plan
from dagkube.store.calls import FinishCall, FinishReply, RequeueCall
from dagkube.store.keys import PoolKeys, RunKeys, hist_run, worker_heartbeat, worker_proc
from dagkube.store.scripts import call_sync
from tests.conftest import wait_until
from tests.tasks import add, total

pytestmark = pytest.mark.integration


@dagkube.task
def boom(x):
    raise ValueError(f"bad input {x}")


@dagkube.task
def describe(mapping):
    return {k: type(v).__name__ for k, v in mapping.items()}


@dagkube.task
def matrix_sum(m):
    return float(m.sum())


@dagkube.task(retries=2)
def flaky(counter_file: str, fail_times: int):
    path = Path(counter_file)
    attempts = int(path.read_text()) if path.exists() else 0
    path.write_text(str(attempts + 1))
    with open(counter_file + ".times", "a") as times:
        times.write(f"{time.time()}\n")
    if attempts < fail_times:
        raise RuntimeError(f"attempt {attempts + 1} fails")
    return attempts + 1


@dagkube.task
def slow_step(x: int, marker_dir: str, seconds: float = 0.4):
    # Written whole, then renamed: a test that sees the marker can read the pid in it.
    marker = Path(marker_dir, f"step-{x}.pid")
    partial = marker.with_suffix(".partial")
    partial.write_text(str(os.getpid()))
    partial.replace(marker)
    time.sleep(seconds)
    return x + 1


@dagkube.task
def lambda_output(x):
    return lambda: x


@dagkube.task
def lock_output(x):
    return threading.Lock()


class Abort(BaseException):
    """Not an Exception, as some libraries raise for their own control flow."""


@dagkube.task(retries=1)
def escape(counter_file: str, how: str):
    path = Path(counter_file)
    path.write_text(str(int(path.read_text()) + 1 if path.exists() else 1))
    if how == "exit":
        sys.exit(3)
    if how == "interrupt":
        raise KeyboardInterrupt("stop here")
    raise Abort("leave the loop")


def tree(values):
    return dagkube.reduce_tree(list(values), add)


def test_tree_reduction_result_and_record(runtime):
    wf = dagkube.Workflow(tree(range(64)), name="it-tree")
    # wukong: auto may pack the tiny sources onto a few workers once the tree has history.
    assert wf.run(runtime=runtime, planner="wukong") == sum(range(64))
    record = wf.last_run.record
    assert record.status == "succeeded"
    assert record.tasks_total == record.tasks_done == 63
    assert record.makespan_s > 0 and record.gb_s > 0 and record.cpu_s_allocated > 0
    assert record.workers_cold + record.workers_warm >= 32  # one invocation per source


def test_outputs_keep_their_shape_and_nested_arguments_flow(runtime):
    a, b = add(1, 2), add(3, 4)
    wf = dagkube.Workflow(
        {"sum": total([a, b, 10]), "kinds": describe({"a": a, "t": (b, "x")}), "a": a},
        name="it-shapes",
    )
    assert wf.run(runtime=runtime) == {"sum": 20, "kinds": {"a": "int", "t": "tuple"}, "a": 3}
    assert dagkube.Workflow([a, b], name="it-list").run(runtime=runtime) == [3, 7]
    assert dagkube.Workflow((a, b), name="it-tuple").run(runtime=runtime) == (3, 7)


def test_large_constants_travel_once_and_run_data_is_freed(runtime, redis_client):
    matrix = np.arange(200_000, dtype=np.float64).reshape(400, 500)
    wf = dagkube.Workflow(
        [matrix_sum(matrix), matrix_sum(matrix)], name="it-const", inline_budget_bytes=4096
    )
    assert len(wf.dag.constants) == 1
    assert wf.run(runtime=runtime) == [float(matrix.sum())] * 2
    run_id = wf.last_run.run_id
    keys = RunKeys(run_id)
    # The caller has its outputs: intermediate data is freed at once, the history stays.
    assert not redis_client.exists(keys.constants, keys.outputs, keys.dag)
    assert redis_client.exists(hist_run(run_id, "meta"), hist_run(run_id, "tasks"))


def test_warm_workers_are_reused_then_idle_ones_exit(make_runtime):
    rt = make_runtime(max_workers=2, idle_timeout_s=1.0)
    wf = dagkube.Workflow(add(add(1, 2), 3), name="it-warm")
    assert wf.run(runtime=rt) == 6
    first = wf.last_run.record
    assert (first.workers_cold, first.workers_warm) == (1, 0)
    assert wf.run(runtime=rt) == 6
    second = wf.last_run.record
    assert (second.workers_cold, second.workers_warm) == (0, 1)
    wait_until(lambda: not rt.worker_pids(), 15, "idle workers to exit")
    assert wf.run(runtime=rt) == 6
    assert wf.last_run.record.workers_cold == 1


def test_sigterm_stops_workers_cleanly_leaving_no_registration(make_runtime, redis_client):
    """Stopped with SIGTERM (cool-down, scale-down, Pod deletion), an idle worker exits 0
    and removes its own registration and heartbeat: nothing is left for the scaler to take
    for a lost worker."""
    rt = make_runtime(max_workers=2)
    wf = dagkube.Workflow([add(1, 2), add(3, 4)], name="it-sigterm")
    assert wf.run(runtime=rt) == [3, 7]
    ids = list(rt.worker_pids())
    workers = PoolKeys(rt.pool).workers
    wait_until(lambda: redis_client.hlen(workers) == len(ids), 15, "every worker to register")
    procs = dict(rt.backend._procs)
    rt.cool_down()
    assert [procs[i][0].returncode for i in ids] == [0] * len(ids)
    assert redis_client.hlen(workers) == 0
    assert not any(redis_client.exists(worker_heartbeat(i)) for i in ids)


def test_plans_start_warm_only_on_idle_workers_that_are_alive(make_runtime, redis_client):
    """An idle entry whose worker process is gone (left for a moment by a stopped worker,
    until the scaler reaps it) is no warm worker: the next plan starts cold."""
    rt = make_runtime(max_workers=2)
    wf = dagkube.Workflow(add(1, 2), name="it-stale-idle")
    assert wf.run(runtime=rt) == 3
    memory = wf.last_plan.workers[0].memory_mib
    warm = rt.plan(wf.dag, "wukong")
    assert warm.workers[0].predicted_startup_s < 0.1  # the worker of the run is idle
    rt.cool_down()
    redis_client.sadd(PoolKeys(rt.pool).idle(memory), "gone-worker")
    cold = rt.plan(wf.dag, "wukong")
    assert cold.workers[0].predicted_startup_s > 0.1, cold.workers


def test_failing_task_raises_task_failed_with_remote_traceback(runtime):
    wf = dagkube.Workflow(total([boom(add(1, 2)), add(5, 5)]), name="it-fail")
    with pytest.raises(dagkube.TaskFailed) as info:
        wf.run(runtime=runtime)
    error = info.value
    assert error.task_id == "boom#0"
    assert error.function == "boom"
    assert error.exc_type == "ValueError"
    assert error.message == "bad input 3"
    assert 'raise ValueError(f"bad input {x}")' in error.remote_traceback
    assert wf.last_run.status == "failed"
    assert wf.last_run.record.failed_task == "boom#0"


def test_retries_rerun_a_failing_task(runtime, tmp_path, redis_client):
    counter = tmp_path / "attempts"
    wf = dagkube.Workflow(flaky(str(counter), 2), name="it-retry")
    assert wf.run(runtime=runtime) == 3
    from dagkube.store.records import TaskRecord

    raw = redis_client.hget(hist_run(wf.last_run.run_id, "tasks"), "flaky#0")
    assert TaskRecord.model_validate_json(raw).retries == 2
    # Retries back off exponentially: 0.1 s before the first, 0.2 s before the second.
    started = [float(t) for t in Path(str(counter) + ".times").read_text().split()]
    pauses = [b - a for a, b in itertools.pairwise(started)]
    assert len(pauses) == 2 and pauses[0] >= 0.1 and pauses[1] >= 0.2, pauses
    counter.unlink()
    with pytest.raises(dagkube.TaskFailed, match="attempt 3 fails"):
        dagkube.Workflow(flaky(str(counter), 5), name="it-retry").run(runtime=runtime)
    assert counter.read_text() == "3"  # first attempt + 2 retries


@pytest.mark.parametrize(
    ("how", "exc_type", "message"),
    [
        ("exit", "SystemExit", "3"),
        ("interrupt", "KeyboardInterrupt", "stop here"),
        ("abort", "Abort", "leave the loop"),
    ],
)
def test_a_base_exception_from_a_task_fails_it_and_spares_the_worker(
    runtime, redis_client, tmp_path, how, exc_type, message
):
    counter = tmp_path / "attempts"
    wf = dagkube.Workflow(escape(str(counter), how), name=f"it-escape-{how}")
    with pytest.raises(dagkube.TaskFailed) as info:
        wf.run(runtime=runtime)
    error = info.value
    assert (error.task_id, error.function, error.exc_type, error.message) == (
        "escape#0",
        "escape",
        exc_type,
        message,
    )
    assert "escape" in error.remote_traceback
    assert counter.read_text() == "2"  # the first attempt and its retry
    record = wf.last_run.record
    assert (record.status, record.failed_task, record.workers_lost) == ("failed", "escape#0", 0)
    from dagkube.store.records import TaskRecord

    raw = redis_client.hget(hist_run(record.run_id, "tasks"), "escape#0")
    task = TaskRecord.model_validate_json(raw)
    assert task.retries == 1 and task.error is not None and task.error.exc_type == exc_type
    # The worker that ran it lives on, registered in its pool, and serves the next run.
    assert redis_client.hexists(PoolKeys(runtime.pool).workers, task.worker_id)
    assert dagkube.Workflow(add(1, 2), name="it-escape-after").run(runtime=runtime) == 3


def test_unserializable_output_fails_clearly(runtime):
    with pytest.raises(dagkube.TaskFailed) as info:
        dagkube.Workflow(lock_output(1), name="it-badout").run(runtime=runtime)
    assert "cannot be serialized" in info.value.message
    # cloudpickle handles what plain pickle cannot
    fn = dagkube.Workflow(lambda_output(5), name="it-lambda").run(runtime=runtime)
    assert fn() == 5


def _run_in_thread(rt, wf):
    box: dict = {}

    def target():
        try:
            box["value"] = wf.run(runtime=rt)
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def test_killed_worker_mid_chain_recomputes_lost_outputs(make_runtime, tmp_path):
    rt = make_runtime(max_workers=2, idle_timeout_s=20)
    node = 0
    for _ in range(5):
        node = slow_step(node, str(tmp_path))
    wf = dagkube.Workflow(node, name="it-kill-chain")
    thread, box = _run_in_thread(rt, wf)
    pid_file = wait_until(
        lambda: (tmp_path / "step-2.pid").exists() and tmp_path / "step-2.pid", 30, "step 2"
    )
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    thread.join(60)
    assert not thread.is_alive()
    assert box.get("value") == 5, box
    record = wf.last_run.record
    assert record.workers_lost == 1
    assert record.status == "succeeded"


def test_killed_worker_in_fanout_is_requeued(make_runtime, tmp_path):
    rt = make_runtime(max_workers=3, idle_timeout_s=20)
    source = add(0, 0)
    wf = dagkube.Workflow(
        total([slow_step(add(source, i), str(tmp_path), 0.3) for i in range(6)]),
        name="it-kill-fan",
    )
    thread, box = _run_in_thread(rt, wf)
    pid_file = wait_until(
        lambda: next(iter(tmp_path.glob("step-*.pid")), None), 30, "a slow step to start"
    )
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    thread.join(60)
    assert box.get("value") == sum(i + 1 for i in range(6)), box
    assert wf.last_run.record.workers_lost == 1


def test_stalled_worker_is_detected_by_heartbeat_and_its_work_requeued(make_runtime, tmp_path):
    rt = make_runtime(max_workers=3, idle_timeout_s=20)
    wf = dagkube.Workflow(
        slow_step(slow_step(0, str(tmp_path), 2.0), str(tmp_path)), name="it-stall"
    )
    thread, box = _run_in_thread(rt, wf)
    pid = int(
        wait_until(lambda: (tmp_path / "step-0.pid").exists(), 30, "step 0")
        and (tmp_path / "step-0.pid").read_text()
    )
    os.kill(pid, signal.SIGSTOP)  # alive to the OS, silent to Redis
    thread.join(60)
    assert box.get("value") == 2, box
    assert wf.last_run.record.workers_lost == 1
    wait_until(lambda: pid not in rt.worker_pids().values(), 10, "the stalled worker to go")


def test_finished_run_keys_expire_and_closing_mid_run_cancels(make_runtime, redis_client, tmp_path):
    rt = make_runtime(max_workers=2, run_ttl_s=120)
    wf = dagkube.Workflow(tree(range(8)), name="it-ttl")
    wf.run(runtime=rt)
    prefix = RunKeys(wf.last_run.run_id).prefix
    run_keys = list(redis_client.scan_iter(f"{prefix}:*"))  # test-only scan
    assert run_keys
    assert all(0 < redis_client.ttl(k) <= 120 for k in run_keys), [
        (k, redis_client.ttl(k)) for k in run_keys
    ]

    slow = dagkube.Workflow(
        slow_step(slow_step(0, str(tmp_path), 5.0), str(tmp_path)), name="it-cancel"
    )
    thread, _ = _run_in_thread(rt, slow)
    wait_until(lambda: (tmp_path / "step-0.pid").exists(), 30, "slow step to start")
    run_id = wait_until(lambda: next(iter(rt._active_runs), None), 5, "the run id")
    rt.close()
    thread.join(30)
    assert not thread.is_alive()
    from dagkube.store.records import RunRecord

    meta = redis_client.hgetall(hist_run(run_id, "meta"))
    record = RunRecord.from_hash({k.decode(): v.decode() for k, v in meta.items()})
    assert record.status == "cancelled"
    leftover = list(redis_client.scan_iter(f"{RunKeys(run_id).prefix}:*"))
    assert all(redis_client.ttl(k) > 0 for k in leftover)


def test_startup_delay_makes_local_cold_starts_cost_what_pods_do(make_runtime, redis_client):
    rt = make_runtime(max_workers=2, startup_delay_s=1.0)
    wf = dagkube.Workflow(add(1, 2), name="it-delay")
    assert wf.run(runtime=rt) == 3
    record = wf.last_run.record
    assert record.startup_delay_s == 1.0 and record.workers_cold == 1
    from dagkube.store.records import WorkerRecord

    (raw,) = redis_client.hvals(hist_run(wf.last_run.run_id, "workers"))
    worker = WorkerRecord.model_validate_json(raw)
    assert worker.cold and worker.first_task_at - worker.spawned_at >= 1.0
    assert wf.run(runtime=rt) == 3  # warm: no delay
    assert wf.last_run.record.workers_warm == 1 and wf.last_run.record.makespan_s < 1.0


def test_the_startup_delay_passes_before_the_imports_and_a_stop_during_it_is_charged(
    make_runtime, redis_client
):
    """The emulated start-up is a Pod's before its interpreter runs: the worker's imports
    (``dagkube.runtime`` and below) come after it. A worker created for a run and stopped
    during the delay stops at once and charges its life until the stop to that run as unused
    (not the imports it needs afterwards to report it)."""
    rt = make_runtime(max_workers=2, startup_delay_s=3.0)
    wf = dagkube.Workflow(add(1, 2), name="it-delay-stop")
    assert wf.run(runtime=rt) == 3
    run_id = wf.last_run.run_id
    assert rt.backend is not None
    rt.call(rt.backend.stop_all())
    handle = rt.call(rt.backend.start_worker(1024, prewarm_for=run_id))
    (pid,) = rt.backend.pids().values()
    time.sleep(1.0)  # the interpreter is up and waiting; the runtime not imported yet
    with open(f"/proc/{pid}/maps") as maps:  # every imported extension module is mapped
        mapped = maps.read()
    assert "hiredis" not in mapped and "pydantic_core" not in mapped
    stopped, asked = time.monotonic(), time.time()
    rt.call(rt.backend.stop_all())
    assert time.monotonic() - stopped < 1.5  # not after the rest of the 3 s
    meta = {
        k.decode(): v.decode() for k, v in redis_client.hgetall(hist_run(run_id, "meta")).items()
    }
    assert int(float(meta["prewarm_wasted"])) == 1
    lived = float(meta["prewarm_wasted_gb_s"])  # 1 GiB from its spawn to the stop
    assert 1.0 <= lived <= asked - handle.spawned_at + 0.2, lived


def test_a_worker_stopped_during_its_imports_reports_being_unused(make_runtime, redis_client):
    """SIGTERM is held from the entry point's first lines until the runtime can answer it: a
    worker created for a run and stopped while it imports still charges that run."""
    rt = make_runtime(max_workers=2)
    wf = dagkube.Workflow(add(1, 2), name="it-import-stop")
    assert wf.run(runtime=rt) == 3
    run_id = wf.last_run.run_id
    assert rt.backend is not None
    rt.call(rt.backend.stop_all())
    rt.call(rt.backend.start_worker(512, prewarm_for=run_id))
    (pid,) = rt.backend.pids().values()

    def holding() -> bool:  # SIGTERM (15) in the blocked mask: the entry point runs
        with open(f"/proc/{pid}/status") as status:
            line = next(x for x in status if x.startswith("SigBlk:"))
        return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))

    deadline = time.monotonic() + 10
    while not holding():  # polled tightly: the imports take a few hundred ms from here
        assert time.monotonic() < deadline, "the worker never held SIGTERM"
        time.sleep(0.001)
    with open(f"/proc/{pid}/maps") as maps:
        assert "pydantic_core" not in maps.read()  # still importing the runtime
    os.kill(pid, signal.SIGTERM)
    rt.call(rt.backend.stop_all())  # waits for its exit
    meta = {
        k.decode(): v.decode() for k, v in redis_client.hgetall(hist_run(run_id, "meta")).items()
    }
    assert int(float(meta["prewarm_wasted"])) == 1


@dagkube.task
def nap(x: int, seconds: float = 0.1) -> int:
    time.sleep(seconds)
    return x


def test_workers_created_for_a_run_but_never_used_are_charged_to_it(make_runtime, redis_client):
    """A fan-out of short tasks with a 1 s start-up: the first worker runs every part before
    the workers the scaler created for them are ready. Those exit unused after their idle
    timeout and charge their lifetime to the run (not to its GB-s), and the report counts it."""
    from dagkube.metrics.history import read_run
    from dagkube.report import charged_gb_s
    from dagkube.store.connection import connect
    from dagkube.store.records import RunRecord

    rt = make_runtime(max_workers=4, startup_delay_s=1.0, idle_timeout_s=0.5)
    root = nap(0)
    wf = dagkube.Workflow(total([add(root, i) for i in range(4)]), name="it-unused")
    assert wf.run("wukong", runtime=rt) == 6
    record = wf.last_run.record
    assert record.workers_cold == 1 and record.workers_unused == 0  # not known yet
    meta_key = hist_run(record.run_id, "meta")

    def charged() -> RunRecord | None:
        meta = {k.decode(): v.decode() for k, v in redis_client.hgetall(meta_key).items()}
        found = RunRecord.from_hash(meta)
        return found if found.workers_unused >= 1 else None

    later = wait_until(charged, 20, "unused workers to charge the run")
    # Each lived at least its 1 s start-up and its 0.5 s idle timeout, at 1 GiB (wukong).
    assert later.workers_unused_gb_s >= later.workers_unused * 1.5 * 1.0
    assert later.gb_s == record.gb_s  # the run's own GB-s unchanged
    wait_until(lambda: not rt.worker_pids(), 20, "every worker to exit")

    async def history():
        redis = await connect(rt.redis_url)
        try:
            return await read_run(redis, record.run_id)
        finally:
            await redis.aclose()

    found = rt.call(history())
    assert found is not None
    assert charged_gb_s(found) >= record.gb_s + later.workers_unused_gb_s


@dagkube.task
def tick(index: int, marker: str, redis_url: str) -> int:
    """The first to run holds Redis's writes for 0.5 s (its COMPLETE waits for them)."""
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return index
    os.write(fd, str(index).encode())
    os.close(fd)
    import redis

    with redis.Redis.from_url(redis_url) as client:
        client.client_pause(500, all=False)
    return index


def test_a_bound_worker_goes_on_while_a_complete_waits_and_sends_those_that_ended_together(
    make_runtime, tmp_path
):
    """Group commit: 40 ready tasks on one bound worker (the plan packs them there once a
    run showed how short they are); while the first one's COMPLETE is held (writes paused),
    the worker executes the others instead of one at most, and their steps land together;
    every output counts once."""
    from dagkube.metrics.history import read_run
    from dagkube.store.connection import connect

    rt = make_runtime(max_workers=1)
    for attempt in ("first", "second"):
        marker = str(tmp_path / attempt)
        wf = dagkube.Workflow(
            total([tick(i, marker, rt.redis_url) for i in range(40)]), name="it-group"
        )
        assert wf.run("uniform", runtime=rt) == sum(range(40))

    async def history():
        redis = await connect(rt.redis_url)
        try:
            return await read_run(redis, wf.last_run.record.run_id)
        finally:
            await redis.aclose()

    found = rt.call(history())
    assert found is not None
    ticks = [t for t in found.tasks if t.function.endswith("tick")]
    assert len({t.task_id for t in ticks}) == 40
    assert {t.logical_worker for t in ticks} == {ticks[0].logical_worker} != {None}
    # the worker runs them one after another: the first one held the writes
    first = min(ticks, key=lambda t: t.started_at)
    assert first.task_id == f"tick#{Path(marker).read_text()}"
    # while they were held (0.5 s from its end), the other ticks ran, not one of them at most
    during = [t for t in ticks if first.ended_at <= t.started_at < first.ended_at + 0.4]
    assert len(during) >= 10, sorted(round(t.started_at - first.ended_at, 3) for t in ticks)


def test_a_requeued_invocation_is_counted_once_when_its_first_worker_finishes_too(redis_client):
    """A worker the scaler took for lost (heartbeat expired) may still finish: its invocation
    was re-queued meanwhile, so only the copy may end it; the run must not end early."""
    run, pool = "requeue-race", "requeue-race"
    keys, queue = RunKeys(run), PoolKeys(pool).queue(512)
    first, copy = worker_proc("first", pool), worker_proc("copy", pool)
    invocation = '{"run": "requeue-race", "mem": 512, "roots": ["a#0"], "queued_at": 1}'
    redis_client.delete(keys.meta, keys.result, first, copy)
    redis_client.hset(
        keys.meta,
        mapping={
            "status": "running",
            "active": 1,
            "tasks_total": 1,
            "submitted_at": 1,
            "workflow": "requeue-race",
            "structure_hash": "requeue-race",
        },
    )
    redis_client.rpush(first, invocation)
    requeue = RequeueCall(
        pool=pool,
        worker_id="first",
        memory_mib=512,
        spawned_at=1,
        now=2,
        oom_killed=False,
        peak_memory_bytes=None,
        exit_code=None,
        max_requeues=3,
    )
    assert call_sync(redis_client, requeue).requeued == 1
    redis_client.lmove(queue, copy, "LEFT", "RIGHT")

    def finish(worker: str) -> FinishReply:
        record = json.dumps({"worker_id": worker})
        call = FinishCall(
            run_id=run,
            pool=pool,
            worker_id=worker,
            worker_field=worker,
            worker_record_json=record,
            gb_s=0.1,
            cpu_s_allocated=0.1,
            cpu_s_used=0.1,
            cold=True,
            prewarmed=False,
            now=3,
            run_ttl_s=60,
            history_cap=10,
            next_queue=None,
        )
        return call_sync(redis_client, call)

    reply = finish("first")
    assert (reply.finalized, reply.status) == (False, "running")
    assert redis_client.hget(keys.meta, "active") == b"1"
    assert finish("copy").finalized and redis_client.hget(keys.meta, "active") == b"0"
    # This run is no workflow of the suite's: leave the shared history as it was.
    redis_client.lrem("dk:hist:all", 0, run)
    redis_client.hdel("dk:hist:structures", "requeue-race")
    redis_client.zrem("dk:hist:used", "requeue-race")
    redis_client.delete(
        "dk:hist:s:requeue-race:runs",
        "dk:hist:wf:requeue-race:runs",
        *(hist_run(run, part) for part in ("meta", "tasks", "workers", "plan")),
        *(f"{keys.prefix}:{part}" for part in ("meta", "result", "keys")),
        queue,
    )


def test_a_worker_writes_its_stacks_to_its_log_on_sigusr1_and_sigusr2_and_carries_on(
    make_runtime,
):
    """How to look into a worker that seems stuck without stopping it (README)."""
    import os
    import signal

    rt = make_runtime(max_workers=1, idle_timeout_s=30)
    assert dagkube.Workflow(nap(0), name="it-stacks").run("wukong", runtime=rt) is not None
    (worker_id, pid), *_ = rt.worker_pids().items()
    log = rt.home / "logs" / f"{worker_id}.log"
    os.kill(pid, signal.SIGUSR1)
    os.kill(pid, signal.SIGUSR2)
    wait_until(
        lambda: "in _take" in log.read_text() and "Current thread" in log.read_text(),
        10,
        "both stack dumps in the worker's log",
    )
    assert dagkube.Workflow(nap(0), name="it-stacks").run("wukong", runtime=rt) is not None
    assert rt.worker_pids() == {worker_id: pid}  # the same worker served it


@dagkube.task
def whose() -> int:
    return os.getpid()


@dagkube.task
def slow_on(pid: int, index: int) -> int:
    """Slow (30 ms) on the worker that ran ``whose``, instant elsewhere."""
    if os.getpid() == pid:
        time.sleep(0.03)
    return index


def test_a_bound_worker_with_nothing_left_takes_ready_tasks_of_a_slower_one(make_runtime):
    """Work stealing: a fan-out of 40 short tasks split between two warm bound workers, slow
    only on the worker that ran the source. The other one, with nothing ready, takes ready
    tasks of the slow one (from the end of its order) and runs them; each task counts once,
    and the slow worker runs at most half of those planned for it."""
    from dagkube.metrics.history import read_run
    from dagkube.store.connection import connect

    rt = make_runtime(max_workers=2)
    source = whose()
    wf = dagkube.Workflow(total([slow_on(source, i) for i in range(40)]), name="it-steal")
    dag = wf.dag
    plan = rt.plan(dag, "uniform")
    # two bound workers: the source, the sum and the first 20 on w0, the other 20 on w1
    for index, task_id in enumerate(t for t in dag.tasks if "slow_on" in t):
        plan.tasks[task_id].worker_id = "w0" if index < 20 else "w1"
    for task_id in dag.tasks:
        if "slow_on" not in task_id:
            plan.tasks[task_id].worker_id = "w0"
    for _ in range(2):  # the first starts both workers: the second finds them warm
        result = rt.run(dag, plan)
        assert result.outputs == sum(range(40))

    async def history():
        redis = await connect(rt.redis_url)
        try:
            return await read_run(redis, result.run_id)
        finally:
            await redis.aclose()

    found = rt.call(history())
    assert found is not None and found.plan_json is not None
    plan = Plan.model_validate_json(found.plan_json)
    planned = {t: p.worker_id for t, p in plan.tasks.items() if "slow_on" in t}
    assert len(set(planned.values())) == 2, plan.notes  # split between two bound workers
    steps = [t for t in found.tasks if t.function.endswith("slow_on")]
    assert len({t.task_id for t in steps}) == 40
    (first,) = [t for t in found.tasks if t.function.endswith("whose")]
    slow = first.logical_worker
    planned_slow = [t for t, w in planned.items() if w == slow]
    ran_slow = [t for t in steps if t.logical_worker == slow]
    taken = [t for t in steps if t.logical_worker != planned[t.task_id]]
    assert taken, "no task ran elsewhere than planned"
    assert len(ran_slow) <= len(planned_slow) // 2, (len(ran_slow), len(planned_slow))
    assert result.record.tasks_stolen >= len(taken)
