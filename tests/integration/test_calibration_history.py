"""The history keeps an auto run's makespan residual under the planner it chose (the run's
``candidate``); older runs (no candidate recorded) and named planners keep theirs."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from dagkube.metrics.history import load_snapshot
from dagkube.store.connection import connect
from tests.history_records import T0, plain_run, store

pytestmark = pytest.mark.integration

STRUCTURE = "calibration-structure"


def _run(
    run_id: str, planner: str, makespan_s: float, candidate: str = "", structure: str = STRUCTURE
):
    history = plain_run()
    run = history.run.model_copy(
        update={
            "run_id": run_id,
            "planner": planner,
            "candidate": candidate,
            "sla": "avg",
            "structure_hash": structure,
            "workflow": "calibration",
            "plan_history_runs": 3,
            "model_makespan_s": 1.0,
            "makespan_s": makespan_s,
        }
    )
    tasks = [t.model_copy(update={"run_id": run_id}) for t in history.tasks]
    return dataclasses.replace(history, run=run, tasks=tasks)


def test_residuals_are_kept_under_the_planner_auto_chose(redis_server, redis_client):
    runs = {
        "calib-old": ("auto", 1.5, ""),  # recorded before the candidate was
        "calib-named": ("uniform", 1.3, ""),
        "calib-auto": ("auto", 1.2, "wukong"),
    }
    for run_id, (planner, makespan_s, candidate) in runs.items():
        store(redis_client, _run(run_id, planner, makespan_s, candidate))

    async def snapshot():
        client = await connect(redis_server.url)
        try:
            return await load_snapshot(client, STRUCTURE)
        finally:
            await client.aclose()

    found = {(r.planner, round(r.seconds, 3)) for r in asyncio.run(snapshot()).residuals}
    assert found == {("wukong", 0.2), ("uniform", 0.3), ("auto", 0.5)}


def test_a_long_lived_cache_reads_each_run_once_and_keeps_only_the_window(
    redis_server, redis_client
):
    """A LocalRuntime plans many runs of one workflow: each run is parsed once, and runs that
    left the snapshot's window are let go (the cache once grew with every run)."""
    from dagkube.metrics.history import SnapshotCache

    ids = [f"cache-run-{n}" for n in range(5)]
    for run_id in ids:
        store(redis_client, _run(run_id, "uniform", 1.1, structure="cache-structure"))
    cache = SnapshotCache()

    async def snapshot(runs: int):
        client = await connect(redis_server.url)
        try:
            return await load_snapshot(client, "cache-structure", runs=runs, cache=cache)
        finally:
            await client.aclose()

    first = asyncio.run(snapshot(runs=5))
    assert first.runs == 5 and len(cache) == 5
    # Parsed once: a record changed in Redis afterwards is not read again.
    redis_client.delete(*(key.decode() for key in redis_client.keys("*cache-run-0*tasks*")))
    assert len(asyncio.run(snapshot(runs=5)).tasks) == len(first.tasks)
    # A narrower window (at most runs * 2 ids are looked at) lets the oldest runs go.
    assert asyncio.run(snapshot(runs=1)).runs == 1 and len(cache) == 2


def test_a_large_workflow_learns_task_times_from_fewer_runs_and_residuals_from_all(
    redis_server, redis_client, monkeypatch
):
    """Task samples stop at about SNAPSHOT_MAX_TASK_SAMPLES (fitting them is most of a plan's
    time), but at least 3 runs; every run's residual, start-ups and overheads still count, so
    that a p90 plan of a large workflow can be calibrated (it needs 9 residuals), and a
    planner chosen now and then keeps the overheads its runs showed."""
    from dagkube.metrics import history

    per_run = len(_run("x", "uniform", 1.1).tasks)
    monkeypatch.setattr(history, "SNAPSHOT_MAX_TASK_SAMPLES", 4 * per_run)
    for n in range(6):
        run = _run(f"large-{n}", "uniform", 1.1, structure="large-structure")
        started = run.workers[0].model_copy(  # a cold start: spawned, then its first task
            update={"run_id": run.run.run_id, "spawned_at": T0 - 60, "first_task_at": T0 - 59.5}
        )
        store(redis_client, dataclasses.replace(run, workers=[started]))

    async def snapshot():
        client = await connect(redis_server.url)
        try:
            return await load_snapshot(client, "large-structure")
        finally:
            await client.aclose()

    found = asyncio.run(snapshot())
    assert found.runs == 6 and len(found.residuals) == 6
    assert len(found.tasks) == 4 * per_run
    assert {t.run_id for t in found.tasks} == {f"large-{n}" for n in (2, 3, 4, 5)}  # newest
    assert len(found.startups) == 6
    assert len(found.overheads) == 6  # each run's one task: its "pre"

    monkeypatch.setattr(history, "SNAPSHOT_MAX_TASK_SAMPLES", 1)  # never fewer than 3 runs
    assert len(asyncio.run(snapshot()).tasks) == 3 * per_run
