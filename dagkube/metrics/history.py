"""Reading the run history from Redis, through its index lists (never scanning the keyspace),
and pruning it."""

from __future__ import annotations

import json
from bisect import bisect_right
from collections import OrderedDict, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from dagkube.errors import InvalidOption
from dagkube.planning.assembly import CALIBRATION_RUNS
from dagkube.planning.history import (
    DuplicateSample,
    HistorySnapshot,
    OverheadSample,
    Residual,
    StartupSample,
    TaskSample,
    calibration_key,
)
from dagkube.store.calls import PrunedRun, PruneIndexesCall, PruneStructureCall
from dagkube.store.keys import (
    hist_all_runs,
    hist_run,
    hist_structure_runs,
    hist_structures,
    hist_used,
    hist_workflow_runs,
)
from dagkube.store.records import RunRecord, RunStatus, TaskRecord, WorkerRecord
from dagkube.store.scripts import Scripts


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
    namespace: str | None = None,
) -> list[str]:
    """Most recent first. ``namespace``: the history of that Kubernetes namespace's runs
    (each namespace has its own); None: the history of runs without one (local runs)."""
    if structure_hash:
        key = hist_structure_runs(structure_hash, namespace)
    elif workflow:
        key = hist_workflow_runs(workflow, namespace)
    else:
        key = hist_all_runs(namespace)
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


WAITED_S = 0.002  # a bound worker that waited longer for its next task: not a sample


def overhead_samples(
    tasks: Sequence[TaskRecord], workers: Sequence[WorkerRecord]
) -> list[OverheadSample]:
    """What one run's workers spent on tasks besides the modelled parts
    (:class:`dagkube.planning.history.OverheadSample`): every task's "pre", and from each
    two consecutive tasks of a worker process, the first's upload end (its end, when the
    upload overlapped the second: a bound worker) to the second's being ready, when the
    second was there to run: in the same invocation ("post") unless the
    worker waited for it (a bound worker's inbox was empty), or in the invocation it took
    next ("handover") if that was queued before the first one finished (otherwise the gap
    holds idle time)."""
    found = [
        OverheadSample(
            t.memory_mib,
            "pre",
            t.started_at - t.ready_at - t.download_s,
            t.logical_worker is not None,
        )
        for t in tasks
        if t.started_at >= t.ready_at + t.download_s
    ]
    served: dict[str, list[WorkerRecord]] = defaultdict(list)
    for worker in workers:
        if worker.outcome == "finished" and worker.ready_at is not None:
            served[worker.worker_id].append(worker)
    ran: dict[str, list[TaskRecord]] = defaultdict(list)
    for task in tasks:
        ran[task.worker_id].append(task)
    for worker_id, done in ran.items():
        invocations = sorted(served.get(worker_id, ()), key=lambda w: w.ready_at or 0.0)
        done.sort(key=lambda t: t.started_at)
        for first, second in pairwise(done):
            gap = second.ready_at - first.ended_at - first.upload_s
            if gap < 0 and second.logical_worker is not None:
                # ready before the first's upload ended: its COMPLETE step overlapped the
                # second task (machine.py), so the step's time is not part of the gap
                gap = second.ready_at - first.ended_at
            before, after = _serving(invocations, first), _serving(invocations, second)
            if gap < 0 or before < 0 or after < 0:
                continue
            if before == after:
                if second.blocked_s > WAITED_S:
                    continue
                kind = "post"
            elif (
                after == before + 1
                and (invocations[after].queued_at or float("inf"))
                <= invocations[before].finished_at
            ):
                kind = "handover"
            else:
                continue
            found.append(
                OverheadSample(second.memory_mib, kind, gap, second.logical_worker is not None)
            )
    return found


def _serving(invocations: list[WorkerRecord], task: TaskRecord) -> int:
    """The index of the invocation (of one worker, by the time taken) the task ran in; -1:
    none recorded."""
    index = bisect_right(invocations, task.started_at, key=lambda w: w.ready_at or 0.0) - 1
    if index >= 0 and task.started_at <= invocations[index].finished_at:
        return index
    return -1


SNAPSHOT_RUNS = 20
# Task samples a snapshot holds, about: a bigger workflow's task times come from fewer (but
# >= 3) runs, pooled over its tasks; fitting them is most of a plan's time on a short run.
# Each run's residual, start-ups and overheads (thinned) come from all of its SNAPSHOT_RUNS:
# calibrating a p90 plan needs 9 residuals, and a planner chosen now and then (wukong's
# invocation handovers) must stay priced by its overheads between its runs.
SNAPSHOT_MAX_TASK_SAMPLES = 5_000
OVERHEAD_SAMPLES_PER_RUN = 100  # of each class, kind and worker mode
MIN_SNAPSHOT_RUNS = 3


@dataclass
class _RunSamples:
    """One finished run's contribution to a snapshot (history never changes once written)."""

    succeeded: bool
    tasks: list[TaskSample] = field(default_factory=list)
    startups: list[StartupSample] = field(default_factory=list)
    residual: Residual | None = None
    overheads: list[OverheadSample] = field(default_factory=list)
    duplicates: list[DuplicateSample] = field(default_factory=list)


def _samples(meta: dict[bytes, bytes], tasks: list[bytes], workers: list[bytes]) -> _RunSamples:
    record = RunRecord.from_hash(_decode(meta))
    if record.status != RunStatus.SUCCEEDED:
        return _RunSamples(succeeded=False)
    found = _RunSamples(succeeded=True)
    # Only an informed plan's error says something about the model: the first runs of a
    # workflow are planned from defaults and miss by whole seconds.
    informed = record.plan_history_runs >= CALIBRATION_RUNS
    if informed and record.model_makespan_s and record.makespan_s:
        found.residual = Residual(
            calibration_key(record.planner, record.candidate or None),
            record.sla,
            record.makespan_s - record.model_makespan_s,
            record.model_makespan_s,
        )
    records = [TaskRecord.model_validate_json(raw) for raw in tasks]
    found.duplicates = _duplicates(records)
    for task in records:
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
                cpu_s=task.cpu_s,
                run_id=task.run_id,
                started_at=task.started_at,
                worker_id=task.worker_id,
            )
        )
    workers_served = [WorkerRecord.model_validate_json(raw) for raw in workers]
    found.overheads = _thinned(overhead_samples(records, workers_served))
    for worker in workers_served:
        if worker.outcome != "finished" or worker.resumed or worker.first_task_at is None:
            continue
        if worker.prewarmed and worker.spawned_at and worker.registered_at:
            # Its start-up is its spawn to being ready (then it waits for the demand): the time
            # prewarm must predict, slower than a start alone when the others of its request
            # start with it.
            ready_s = worker.registered_at - worker.spawned_at
            found.startups.append(StartupSample(worker.memory_mib, True, ready_s, prewarmed=True))
            continue
        began = worker.spawned_at if worker.cold else worker.ready_at
        if began is not None:
            found.startups.append(
                StartupSample(worker.memory_mib, worker.cold, worker.first_task_at - began)
            )
    return found


def _duplicates(records: list[TaskRecord]) -> list[DuplicateSample]:
    """What each of a run's taskdup duplicates gained against its original (both recorded:
    the original finishes even when the duplicate completed the task first)."""
    originals = {t.task_id: t for t in records if not t.duplicate}
    found: list[DuplicateSample] = []
    for task in records:
        original = originals.get(task.task_id) if task.duplicate else None
        if original is None or original.error is not None or task.error is not None:
            continue
        saved_s = original.ended_at - task.ended_at
        found.append(DuplicateSample(task.function, task.task_id, round(saved_s, 6)))
    return found


def _thinned(samples: list[OverheadSample]) -> list[OverheadSample]:
    """At most OVERHEAD_SAMPLES_PER_RUN of each class, kind and worker mode, taken evenly
    from the run's (in the order its records came): the predictor takes their median, and a
    snapshot holds every run's."""
    groups: dict[tuple[int, str, bool], list[OverheadSample]] = defaultdict(list)
    for sample in samples:
        groups[(sample.memory_mib, sample.kind, sample.bound)].append(sample)
    kept: list[OverheadSample] = []
    for group in groups.values():
        step = len(group) / OVERHEAD_SAMPLES_PER_RUN
        kept += (
            group if step <= 1 else [group[int(k * step)] for k in range(OVERHEAD_SAMPLES_PER_RUN)]
        )
    return kept


class SnapshotCache:
    """Parsed runs a long-lived caller keeps between plans, so each run is read only once:
    per workflow structure, only the runs its last snapshot looked at (older ones left the
    window for good), for the CACHED_STRUCTURES structures planned most recently."""

    CACHED_STRUCTURES = 16

    def __init__(self) -> None:
        self._by_structure: OrderedDict[str, dict[str, _RunSamples]] = OrderedDict()

    def runs(self, structure_hash: str, ids: Sequence[str]) -> dict[str, _RunSamples]:
        """The structure's cached runs, pruned to ``ids``; marks it the most recent."""
        cached = self._by_structure.pop(structure_hash, {})
        kept = {run_id: cached[run_id] for run_id in ids if run_id in cached}
        self._by_structure[structure_hash] = kept
        while len(self._by_structure) > self.CACHED_STRUCTURES:
            self._by_structure.popitem(last=False)
        return kept

    def __len__(self) -> int:
        """Runs held, over every structure."""
        return sum(len(runs) for runs in self._by_structure.values())


async def load_snapshot(
    redis: Any,
    structure_hash: str,
    *,
    runs: int = SNAPSHOT_RUNS,
    cache: SnapshotCache | None = None,
    namespace: str | None = None,
) -> HistorySnapshot:
    """The samples planners learn from: task and worker records of the last ``runs``
    successful runs of this structure (failed runs' timings would mislead predictions); task
    samples only from the newest of them that hold at most about SNAPSHOT_MAX_TASK_SAMPLES
    (but at least 3 runs).

    ``cache`` lets a long-lived caller read each run only once.
    ``namespace``: learn from that namespace's history (see :func:`run_ids`).
    """
    ids = await run_ids(redis, structure_hash=structure_hash, limit=runs * 2, namespace=namespace)
    cache = cache if cache is not None else SnapshotCache()
    parsed = cache.runs(f"{namespace or ''}/{structure_hash}", ids)
    unseen = [run_id for run_id in ids if run_id not in parsed]
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
                parsed[run_id] = _samples(meta, tasks, workers)
    snapshot = HistorySnapshot(structure_hash=structure_hash)
    sampling = True  # task samples still taken (newest runs first)
    for run_id in ids:
        found = parsed.get(run_id)
        if found is None or not found.succeeded:
            continue
        if snapshot.runs >= runs:
            break
        if (
            sampling
            and snapshot.runs >= MIN_SNAPSHOT_RUNS
            and len(snapshot.tasks) + len(found.tasks) > SNAPSHOT_MAX_TASK_SAMPLES
        ):
            sampling = False
        snapshot.runs += 1
        if sampling:
            snapshot.tasks += found.tasks
        snapshot.overheads += found.overheads
        snapshot.startups += found.startups
        snapshot.duplicates += found.duplicates
        if found.residual:
            snapshot.residuals.append(found.residual)
    return snapshot


@dataclass
class PruneReport:
    """What ``prune_history`` removed (or, dry, would remove)."""

    removed: list[PrunedRun] = field(default_factory=list)  # oldest first
    runs_kept: int = 0  # in the structures looked at
    structures_emptied: list[str] = field(default_factory=list)
    missing: set[str] = field(default_factory=set)  # runs indexed whose records were gone


async def prune_history(
    redis: Any,
    *,
    keep_runs: int | None = None,
    finished_before: float | None = None,
    workflow: str | None = None,
    dry_run: bool = False,
    namespace: str | None = None,
) -> PruneReport:
    """Remove, per workflow structure, the runs beyond the newest ``keep_runs`` and those that
    finished before ``finished_before`` (Unix seconds); only runs of ``workflow`` when given.
    Each structure is pruned in one atomic step that removes a run's records with every
    index entry naming it; index entries naming runs whose records are gone go too. A
    structure left without runs is dropped. ``dry_run``: report only, change nothing.
    ``namespace``: prune that namespace's history (see :func:`run_ids`)."""
    if keep_runs is None and finished_before is None:
        raise InvalidOption(
            "Nothing to prune: give the runs to keep per structure (keep_runs >= 0) and/or "
            "how old a removed run is (finished_before, Unix seconds)"
        )
    if keep_runs is not None and keep_runs < 0:
        raise InvalidOption(f"keep_runs={keep_runs} is invalid: use a whole number >= 0")
    structures = await redis.hgetall(hist_structures(namespace))
    names = {k.decode(): v.decode() for k, v in structures.items()}
    for structure in await redis.zrange(hist_used(namespace), 0, -1):  # if the hash lost one
        names.setdefault(structure.decode(), "")
    if workflow is None:
        selected = sorted(names)
    else:  # the hash names a structure's latest workflow; its runs may carry others
        listed = await redis.lrange(hist_workflow_runs(workflow, namespace), 0, -1)
        async with redis.pipeline(transaction=False) as pipe:
            for run_id in listed:
                pipe.hget(hist_run(run_id.decode(), "meta"), "structure_hash")
            found = {s.decode() for s in await pipe.execute() if s}
        selected = sorted({s for s, name in names.items() if name == workflow} | found)
    scripts = Scripts(redis)
    report = PruneReport()
    for structure in selected:
        reply = await scripts.prune_structure(
            PruneStructureCall(
                namespace=namespace,
                structure_hash=structure,
                keep_runs=keep_runs,
                finished_before=finished_before,
                dry_run=dry_run,
                workflow=workflow,
            )
        )
        report.removed += reply.removed
        report.missing.update(reply.missing)
        report.runs_kept += reply.kept
        if reply.left == 0:
            report.structures_emptied.append(structure)
    if workflow is not None:
        indexes = [hist_workflow_runs(workflow, namespace)]
    else:
        named = {name for name in names.values() if name} | {r.workflow for r in report.removed}
        indexes = [
            hist_all_runs(namespace),
            *(hist_workflow_runs(name, namespace) for name in sorted(named)),
        ]
    pruned = await scripts.prune_indexes(
        PruneIndexesCall(namespace=namespace, indexes=indexes, dry_run=dry_run)
    )
    report.missing.update(pruned.missing)
    report.removed.sort(key=lambda r: r.finished_at)
    return report
