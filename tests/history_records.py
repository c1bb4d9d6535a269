"""Run histories written straight into Redis under the keys a finalized run leaves, with every
memory field set by hand: the exporter, the report and the CLI are checked against known
numbers (an OOM kill needs cgroup limits, which not every test machine allows)."""

from __future__ import annotations

import json
from typing import Any

import redis

from dagkube.metrics.history import RunHistory
from dagkube.store.keys import HIST_ALL_RUNS, hist_run, hist_structure_runs, hist_workflow_runs
from dagkube.store.records import OomAttempt, RunRecord, TaskRecord, WorkerRecord

MIB = 1024 * 1024
T0 = 1_760_000_000.0


def _task(
    task_id: str, worker_id: str, memory_mib: int, start: float, end: float, **extra: Any
) -> TaskRecord:
    return TaskRecord(
        run_id="oom-run",
        task_id=task_id,
        function=task_id.split("#")[0],
        worker_id=worker_id,
        memory_mib=memory_mib,
        ready_at=T0 + start - 0.1,
        inputs_ready_at=T0 + start,
        started_at=T0 + start,
        ended_at=T0 + end,
        **extra,
    )


def oom_run() -> RunHistory:
    """``load#0 -> hog#0 -> after#0`` under enforced limits: ``hog#0`` was OOM-killed at
    256 MiB (its worker peaked at 262 MiB) and re-ran at 1024 MiB, peaking at 700 MiB;
    ``after#0`` has no peak (not measured)."""
    run = RunRecord(
        run_id="oom-run",
        workflow="mem-demo",
        structure_hash="mem-demo-structure",
        planner="wukong",
        sla="avg",
        status="succeeded",
        submitted_at=T0,
        finished_at=T0 + 4.5,
        completed_at=T0 + 4.0,
        makespan_s=4.0,
        predicted_makespan_s=3.5,
        tasks_total=3,
        tasks_done=3,
        workers_cold=2,
        workers_lost=1,
        gb_s=3.25,
        enforced=True,
        oom_kills=1,
        escalations=1,
        peak_memory_bytes=700 * MIB,  # as FINISH keeps it: the highest of the tasks' peaks
    )
    tasks = [
        _task("load#0", "w-a", 256, 0.2, 1.0, peak_memory_bytes=180 * MIB),
        _task(
            "hog#0",
            "w-c",
            1024,
            2.0,
            3.5,
            peak_memory_bytes=700 * MIB,
            oom_attempts=[OomAttempt(memory_mib=256, peak_memory_bytes=262 * MIB)],
        ),
        _task("after#0", "w-c", 1024, 3.6, 4.0),
    ]
    workers = [
        WorkerRecord(
            run_id="oom-run",
            worker_id="w-a",
            memory_mib=256,
            cold=True,
            finished_at=T0 + 1.1,
            tasks_served=1,
            peak_memory_bytes=180 * MIB,
        ),
        WorkerRecord(
            run_id="oom-run",
            worker_id="w-b",
            memory_mib=256,
            outcome="lost",
            cold=True,
            spawned_at=T0 + 1.0,
            finished_at=T0 + 1.9,
            peak_memory_bytes=262 * MIB,
            oom_killed=True,
            exit_code=137,
            lost_task="hog#0",
        ),
        WorkerRecord(
            run_id="oom-run",
            worker_id="w-c",
            memory_mib=1024,
            cold=True,
            finished_at=T0 + 4.1,
            tasks_served=2,
            peak_memory_bytes=700 * MIB,
        ),
    ]
    edges = {"load#0": [], "hog#0": ["load#0"], "after#0": ["hog#0"]}
    return RunHistory(run=run, tasks=tasks, workers=workers, edges=edges)


def plain_run() -> RunHistory:
    """A run recorded before peaks were measured: no limits, no peaks, no OOM kills."""
    run = RunRecord(
        run_id="plain-run",
        workflow="mem-demo",
        structure_hash="mem-demo-structure",
        planner="uniform",
        sla="p90",
        status="succeeded",
        submitted_at=T0 - 60,
        finished_at=T0 - 58,
        completed_at=T0 - 58.5,
        makespan_s=1.5,
        tasks_total=1,
        tasks_done=1,
        workers_cold=1,
        gb_s=0.5,
    )
    task = _task("load#0", "w-p", 512, -59.5, -58.5).model_copy(update={"run_id": "plain-run"})
    worker = WorkerRecord(
        run_id="plain-run", worker_id="w-p", memory_mib=512, cold=True, finished_at=T0 - 58
    )
    return RunHistory(run=run, tasks=[task], workers=[worker], edges={"load#0": []})


def store(client: redis.Redis, history: RunHistory) -> None:
    """Write a run's history as FINALIZE leaves it: the meta hash (strings), the record
    hashes, the edges, and the run at the head of its index lists."""
    meta: dict[str, str | int | float] = {}
    for key, value in history.run.model_dump().items():
        if value is None:
            continue
        if isinstance(value, bool):
            meta[key] = int(value)
        elif isinstance(value, list):
            meta[key] = ",".join(value)
        elif isinstance(value, dict):
            meta[key] = json.dumps(value)
        else:
            meta[key] = value
    run_id = history.run.run_id
    client.hset(hist_run(run_id, "meta"), mapping=meta)
    for task in history.tasks:
        client.hset(hist_run(run_id, "tasks"), task.task_id, task.model_dump_json())
    for worker in history.workers:
        client.hset(hist_run(run_id, "workers"), worker.worker_id, worker.model_dump_json())
    client.set(hist_run(run_id, "edges"), json.dumps(history.edges))
    client.lpush(hist_structure_runs(history.run.structure_hash), run_id)
    client.lpush(hist_workflow_runs(history.run.workflow), run_id)
    client.lpush(HIST_ALL_RUNS, run_id)
