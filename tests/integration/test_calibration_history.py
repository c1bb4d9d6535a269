"""The history keeps an auto run's makespan residual under the planner it chose (the run's
``candidate``); older runs (no candidate recorded) and named planners keep theirs."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from dagkube.metrics.history import load_snapshot
from dagkube.store.connection import connect
from tests.history_records import plain_run, store

pytestmark = pytest.mark.integration

STRUCTURE = "calibration-structure"


def _run(run_id: str, planner: str, makespan_s: float, candidate: str = ""):
    history = plain_run()
    run = history.run.model_copy(
        update={
            "run_id": run_id,
            "planner": planner,
            "candidate": candidate,
            "sla": "avg",
            "structure_hash": STRUCTURE,
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
