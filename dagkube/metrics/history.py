"""Reading the run history from Redis, through its index lists (never scanning the keyspace)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from dagkube.metrics.records import RunRecord, TaskRecord, WorkerRecord
from dagkube.planning.history import HistorySnapshot, StartupSample, TaskSample
from dagkube.planning.planners import CALIBRATION_RUNS
from dagkube.runtime.keys import (
    HIST_ALL_RUNS,
    hist_run,
    hist_structure_runs,
    hist_workflow_runs,
)


@dataclass
class RunHistory:
    """Everything one run left behind."""

    run: RunRecord
    tasks: list[TaskRecord] = field(default_factory=list)
    workers: list[WorkerRecord] = field(default_factory=list)
    plan_json: str | None = None
    edges: dict[str, list[str]] = field(default_factory=dict)  # task -> upstream tasks


def _decode(fields: dict[bytes, bytes]) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in fields.items()}


async def run_ids(
    redis: Any,
    *,
    workflow: str | None = None,
    structure_hash: str | None = None,
    limit: int = 50,
) -> list[str]:
    """Most recent first."""
    if structure_hash:
        key = hist_structure_runs(structure_hash)
    elif workflow:
        key = hist_workflow_runs(workflow)
    else:
        key = HIST_ALL_RUNS
    return [r.decode() for r in await redis.lrange(key, 0, max(0, limit - 1))]


async def list_runs(
    redis: Any,
    *,
    workflow: str | None = None,
    structure_hash: str | None = None,
    limit: int = 50,
) -> list[RunRecord]:
    """Run records, most recent first; runs trimmed from the history are skipped."""
    ids = await run_ids(redis, workflow=workflow, structure_hash=structure_hash, limit=limit)
    async with redis.pipeline(transaction=False) as pipe:
        for run_id in ids:
            pipe.hgetall(hist_run(run_id, "meta"))
        metas = await pipe.execute()
    return [RunRecord.from_hash(_decode(meta)) for meta in metas if meta]


async def read_record(redis: Any, run_id: str) -> RunRecord | None:
    """One run's record from the history (None if not there, e.g. trimmed)."""
    meta = await redis.hgetall(hist_run(run_id, "meta"))
    return RunRecord.from_hash(_decode(meta)) if meta else None


async def read_run(redis: Any, run_id: str) -> RunHistory | None:
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hgetall(hist_run(run_id, "meta"))
        pipe.hvals(hist_run(run_id, "tasks"))
        pipe.hvals(hist_run(run_id, "workers"))
        pipe.get(hist_run(run_id, "plan"))
        pipe.get(hist_run(run_id, "edges"))
        meta, tasks, workers, plan, edges = await pipe.execute()
    if not meta:
        return None
    return RunHistory(
        run=RunRecord.from_hash(_decode(meta)),
        tasks=sorted(
            (TaskRecord.model_validate_json(t) for t in tasks), key=lambda t: t.started_at
        ),
        workers=sorted(
            (WorkerRecord.model_validate_json(w) for w in workers),
            key=lambda w: w.ready_at or w.spawned_at or w.finished_at,
        ),
        plan_json=plan.decode() if plan else None,
        edges=json.loads(edges) if edges else {},
    )


SNAPSHOT_RUNS = 20
SNAPSHOT_MAX_TASK_SAMPLES = 10_000  # bigger workflows learn from fewer (but >= 3) runs
MIN_SNAPSHOT_RUNS = 3


@dataclass
class _RunSamples:
    """One finished run's contribution to a snapshot (history never changes once written)."""

    succeeded: bool
    tasks: list[TaskSample] = field(default_factory=list)
    startups: list[StartupSample] = field(default_factory=list)
    residual: tuple[str, float] | None = None


def _samples(meta: dict[bytes, bytes], tasks: list[bytes], workers: list[bytes]) -> _RunSamples:
    record = RunRecord.from_hash(_decode(meta))
    if record.status != "succeeded":
        return _RunSamples(succeeded=False)
    found = _RunSamples(succeeded=True)
    # Only an informed plan's error says something about the model: the first runs of a
    # workflow are planned from defaults and miss by whole seconds.
    informed = record.plan_history_runs >= CALIBRATION_RUNS
    if informed and record.model_makespan_s and record.makespan_s:
        found.residual = (record.planner, record.makespan_s - record.model_makespan_s)
    for raw in tasks:
        task = TaskRecord.model_validate_json(raw)
        found.tasks.append(
            TaskSample(
                task_id=task.task_id,
                function=task.function,
                memory_mib=task.memory_mib,
                input_bytes=task.input_bytes,
                output_bytes=task.output_bytes,
                exec_s=task.ended_at - task.started_at,
                download_bytes=task.download_bytes,
                download_s=task.download_s,
                upload_bytes=task.output_bytes if task.output_stored else 0,
                upload_s=task.upload_s,
                peak_memory_bytes=task.peak_memory_bytes or 0,
                oom_mib=max((a.memory_mib for a in task.oom_attempts), default=0),
            )
        )
    for raw in workers:
        worker = WorkerRecord.model_validate_json(raw)
        if worker.outcome != "finished" or worker.resumed or worker.first_task_at is None:
            continue
        began = worker.spawned_at if worker.cold else worker.ready_at
        if began is not None:
            found.startups.append(
                StartupSample(worker.memory_mib, worker.cold, worker.first_task_at - began)
            )
    return found


async def load_snapshot(
    redis: Any,
    structure_hash: str,
    *,
    runs: int = SNAPSHOT_RUNS,
    cache: dict[str, _RunSamples] | None = None,
) -> HistorySnapshot:
    """The samples planners learn from: task and worker records of the last ``runs``
    successful runs of this structure (failed runs' timings would mislead predictions), at
    most about SNAPSHOT_MAX_TASK_SAMPLES task samples (but at least 3 runs).

    ``cache`` (run id -> parsed samples) lets a long-lived caller read each run only once.
    """
    cache = {} if cache is None else cache
    ids = await run_ids(redis, structure_hash=structure_hash, limit=runs * 2)
    unseen = [run_id for run_id in ids if run_id not in cache]
    if unseen:
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in unseen:
                pipe.hgetall(hist_run(run_id, "meta"))
                pipe.hvals(hist_run(run_id, "tasks"))
                pipe.hvals(hist_run(run_id, "workers"))
            replies = await pipe.execute()
        for index, run_id in enumerate(unseen):
            meta, tasks, workers = replies[3 * index : 3 * index + 3]
            if meta:
                cache[run_id] = _samples(meta, tasks, workers)
    snapshot = HistorySnapshot(structure_hash=structure_hash)
    for run_id in ids:
        found = cache.get(run_id)
        if found is None or not found.succeeded:
            continue
        full = snapshot.runs >= runs or (
            snapshot.runs >= MIN_SNAPSHOT_RUNS
            and len(snapshot.tasks) + len(found.tasks) > SNAPSHOT_MAX_TASK_SAMPLES
        )
        if full:
            break
        snapshot.runs += 1
        snapshot.tasks += found.tasks
        snapshot.startups += found.startups
        if found.residual:
            snapshot.residuals.append(found.residual)
    return snapshot
