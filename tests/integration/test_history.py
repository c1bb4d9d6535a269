"""Every run leaves complete records (the seed notes' "not all workflows store metrics" bug)."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

import dagkube
from dagkube.metrics.history import list_runs, read_run
from dagkube.runtime.connection import connect
from dagkube.runtime.keys import hist_run, hist_structure_runs
from tests.conftest import wait_until
from tests.integration.test_runtime import _run_in_thread, boom, slow_step
from tests.tasks import add, total

pytestmark = pytest.mark.integration


def read_histories(url: str, run_ids: list[str]):
    async def go():
        client = await connect(url)
        try:
            return [await read_run(client, run_id) for run_id in run_ids]
        finally:
            await client.aclose()

    return asyncio.run(go())


def fanout(name: str, width: int):
    source = add(1, 1)
    return dagkube.Workflow(total([add(source, i) for i in range(width)]), name=name)


def run_killing_a_worker(rt, tmp_path):
    node = 0
    for _ in range(4):
        node = slow_step(node, str(tmp_path), 0.3)
    wf = dagkube.Workflow(node, name="hist-b")
    thread, box = _run_in_thread(rt, wf)
    pid_file = tmp_path / "step-1.pid"
    wait_until(pid_file.exists, 30, "step 1 to start")
    os.kill(int(pid_file.read_text()), signal.SIGKILL)
    thread.join(60)
    assert box.get("value") == 4, box
    return wf


def test_ten_runs_of_two_workflows_leave_complete_records(make_runtime, redis_server, tmp_path):
    rt = make_runtime(max_workers=2, idle_timeout_s=20)
    run_ids: list[str] = []
    expectations: dict[str, str] = {}
    for index in range(10):
        if index == 3:  # a failed run
            wf = dagkube.Workflow(total([boom(add(1, 2)), add(3, 4)]), name="hist-a")
            with pytest.raises(dagkube.TaskFailed):
                wf.run(runtime=rt)
            expectations[wf.last_run.run_id] = "failed"
        elif index == 6:  # a run whose worker is killed mid-task
            wf = run_killing_a_worker(rt, tmp_path)
            expectations[wf.last_run.run_id] = "lost-worker"
        else:
            wf = fanout("hist-a", 6) if index % 2 == 0 else fanout("hist-b", 9)
            wf.run(runtime=rt)
            expectations[wf.last_run.run_id] = "ok"
        run_ids.append(wf.last_run.run_id)

    histories = read_histories(redis_server.url, run_ids)
    assert len(histories) == 10
    for run_id, history in zip(run_ids, histories, strict=True):
        assert history is not None, f"run {run_id} left no history"
        run = history.run
        kind = expectations[run_id]
        assert history.plan_json and '"planner":"wukong"' in history.plan_json
        assert run.makespan_s is not None and run.makespan_s > 0
        assert run.gb_s > 0 and run.cpu_s_allocated > 0
        assert run.finished_at is not None and run.finished_at >= run.submitted_at
        task_ids = {t.task_id for t in history.tasks}
        worker_ids = {w.worker_id for w in history.workers}
        if kind == "failed":
            assert run.status == "failed" and run.failed_task == "boom#0"
            failed = [t for t in history.tasks if t.error is not None]
            assert [t.task_id for t in failed] == ["boom#0"]
            assert failed[0].error.exc_type == "ValueError"
            assert "add#0" in task_ids
        else:
            assert run.status == "succeeded"
            assert len(history.tasks) == run.tasks_total == run.tasks_done, run_id
        for task in history.tasks:
            assert task.worker_id in worker_ids, f"{run_id}: no record of {task.worker_id}"
            assert task.ready_at <= task.inputs_ready_at <= task.started_at <= task.ended_at
            assert task.memory_mib == 1024
            if task.output_stored and task.error is None:
                assert task.output_bytes > 0
        finished = [w for w in history.workers if w.outcome == "finished"]
        lost_ids = {w.worker_id for w in history.workers if w.outcome == "lost"}
        done_by_lost = sum(1 for t in history.tasks if t.worker_id in lost_ids)
        assert sum(w.tasks_served for w in finished) + done_by_lost >= run.tasks_done
        assert run.workers_cold + run.workers_warm == len(finished)
        for worker in finished:
            assert worker.ready_at is not None and worker.finished_at >= worker.ready_at
            if worker.cold:
                assert worker.spawned_at is not None and worker.spawned_at <= worker.ready_at
        if kind == "lost-worker":
            assert run.workers_lost == 1
            assert [w.outcome for w in history.workers].count("lost") == 1
            assert any(w.resumed for w in finished)
            assert any(t.recomputed for t in history.tasks)


def test_history_is_capped_per_structure(make_runtime, redis_server, redis_client):
    rt = make_runtime(max_workers=2, history_cap=3)
    run_ids = []
    for _ in range(5):
        wf = fanout("hist-cap", 4)
        wf.run(runtime=rt)
        run_ids.append(wf.last_run.run_id)
    kept = [r.decode() for r in redis_client.lrange(hist_structure_runs(wf.structure_hash), 0, -1)]
    assert kept == list(reversed(run_ids))[:3]
    for old in run_ids[:2]:
        for part in ("meta", "tasks", "workers", "plan"):
            assert not redis_client.exists(hist_run(old, part)), (old, part)

    async def listed():
        client = await connect(redis_server.url)
        try:
            return await list_runs(client, workflow="hist-cap")
        finally:
            await client.aclose()

    assert [r.run_id for r in asyncio.run(listed())] == list(reversed(run_ids))[:3]
