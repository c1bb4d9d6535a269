"""Every run leaves complete records (the seed notes' "not all workflows store metrics" bug)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
import redis

import dagkube
from dagkube.metrics.history import list_runs, read_run
from dagkube.store import scripts
from dagkube.store.calls import FinishCall, ForceEndCall, PruneStructureCall
from dagkube.store.connection import connect
from dagkube.store.keys import (
    HIST_ALL_RUNS,
    HIST_STRUCTURES,
    HIST_USED,
    RunKeys,
    hist_run,
    hist_structure_runs,
    hist_workflow_runs,
)
from dagkube.store.records import (
    ERROR_MESSAGE_MAX_BYTES,
    ERROR_TRACEBACK_MAX_BYTES,
    RunRecord,
    TaskRecord,
)
from dagkube.store.scripts import call_sync
from tests.conftest import ROOT, run_cli, wait_until
from tests.integration.test_runtime import _run_in_thread, boom, slow_step
from tests.tasks import add, total

pytestmark = pytest.mark.integration

HIST_PARTS = ("meta", "tasks", "workers", "plan", "edges")
CAPS_DB = 13  # databases of their own: these tests drop whole structures from the history
PRUNE_DB = 14


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
        assert history.plan_json and '"planner":"auto"' in history.plan_json  # the default
        planned = json.loads(history.plan_json)["tasks"]
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
            assert task.memory_mib == planned[task.task_id]["memory_mib"]
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


def test_a_worker_lost_while_re_running_lost_outputs_leaves_what_it_re_ran(
    make_runtime, redis_server, tmp_path
):
    """A chain's worker is killed at step 6 (steps 0-5 lived only in its memory); the worker
    that resumes it re-runs them from their lineage and is killed at step 3 of that: what it
    had re-run (steps 0-2) was stored as it went, so the third worker re-runs steps 3-5 only."""
    rt = make_runtime(max_workers=2, idle_timeout_s=20)
    node = 0
    for _ in range(8):
        node = slow_step(node, str(tmp_path), 0.3)
    wf = dagkube.Workflow(node, name="hist-rerun")
    thread, box = _run_in_thread(rt, wf)
    marker = tmp_path / "step-6.pid"
    wait_until(marker.exists, 30, "step 6 to start")
    first = int(marker.read_text())
    os.kill(first, signal.SIGKILL)
    marker = tmp_path / "step-3.pid"
    wait_until(lambda: int(marker.read_text()) != first, 30, "step 3 to be re-run")
    os.kill(int(marker.read_text()), signal.SIGKILL)
    thread.join(60)
    assert box.get("value") == 8, box
    [history] = read_histories(redis_server.url, [wf.last_run.run_id])
    assert history.run.workers_lost == 2 and history.run.status == "succeeded"
    [recomputed] = [t.recomputed for t in history.tasks if t.recomputed]
    assert [t.split("#")[1] for t in recomputed] == ["3", "4", "5"], recomputed


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


def test_a_huge_task_error_is_stored_and_printed_capped(redis_server, redis_client):
    """A task raising with a 20 MB message (80 MB in Redis before the caps): the run fails,
    its stored error keeps the head and the tail within the caps, and the CLI prints that."""
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    result = run_cli("run", str(ROOT / "tests" / "data" / "huge_error_workflow.py"), env=env)
    assert result.returncode == 1, result.stderr[-2000:]
    assert "task shout#0 (function shout) raised ValueError: HEAD xxx" in result.stderr
    assert " bytes truncated] …" in result.stderr and "xxx TAIL" in result.stderr
    assert len(result.stderr.encode()) < ERROR_MESSAGE_MAX_BYTES + ERROR_TRACEBACK_MAX_BYTES + 4096
    (listed,) = json.loads(
        run_cli("history", "--workflow", "huge-error", "--limit", "1", "--json", env=env).stdout
    )
    run_id = listed["run_id"]
    record = RunRecord.from_hash(
        {k.decode(): v.decode() for k, v in redis_client.hgetall(hist_run(run_id, "meta")).items()}
    )
    assert (record.status, record.failed_task) == ("failed", "shout#0")
    assert record.error is not None
    stored = [record.error["message"], record.error["traceback"]]
    task = TaskRecord.model_validate_json(redis_client.hget(hist_run(run_id, "tasks"), "shout#0"))
    assert task.error is not None
    assert stored == [task.error.message, task.error.traceback]
    message, traceback = stored
    assert message.startswith("HEAD xxx") and message.endswith("xxx TAIL")
    assert len(message.encode()) <= ERROR_MESSAGE_MAX_BYTES
    assert len(traceback.encode()) <= ERROR_TRACEBACK_MAX_BYTES
    assert "raise ValueError" in traceback and traceback.endswith("xxx TAIL\n")
    for key in (RunKeys(run_id).meta, hist_run(run_id, "meta"), hist_run(run_id, "tasks")):
        assert redis_client.memory_usage(key, samples=0) < 128 * 1024, key  # 40 MB before


def _db_url(redis_server, db: int) -> str:
    return redis_server.url.rsplit("/", 1)[0] + f"/{db}"


@pytest.fixture
def caps_db(redis_server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(_db_url(redis_server, CAPS_DB))
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


def assert_history_whole(client: redis.Redis) -> None:
    """Every index entry names a run with records, and every run with records is indexed by
    its structure (test-only scan of a private database)."""
    structures = [s.decode() for s in client.hkeys(HIST_STRUCTURES)]
    assert sorted(structures) == sorted(s.decode() for s in client.zrange(HIST_USED, 0, -1))
    indexed: set[str] = set()
    lists = [HIST_ALL_RUNS, *(hist_structure_runs(s) for s in structures)]
    lists += [k.decode() for k in client.scan_iter("dk:hist:wf:*")]
    for key in lists:
        for run_id in (r.decode() for r in client.lrange(key, 0, -1)):
            assert client.exists(hist_run(run_id, "meta")), f"{key} names {run_id}, gone"
            indexed.add(run_id)
    for structure in structures:
        assert client.llen(hist_structure_runs(structure)) > 0, structure
    for key in client.scan_iter("dk:hist:r:*"):
        run_id = key.decode().split(":")[3]
        structure = client.hget(hist_run(run_id, "meta"), "structure_hash")
        assert structure is not None, f"{key!r} left without its run's meta"
        runs = client.lrange(hist_structure_runs(structure.decode()), 0, -1)
        assert run_id.encode() in runs, f"{key!r} is in no index"


def run_parts(client: redis.Redis, run_id: str) -> list[str]:
    return [part for part in HIST_PARTS if client.exists(hist_run(run_id, part))]


def test_history_keeps_the_most_recently_used_structures(redis_server, caps_db, tmp_path):
    """A cap on structures: beyond it, the least recently run one goes with all its runs."""
    runs: dict[str, list[str]] = {"a": [], "b": [], "c": []}
    shapes = {"a": 2, "b": 3, "c": 4}
    with dagkube.LocalRuntime(
        _db_url(redis_server, CAPS_DB),
        home=tmp_path / "home",
        max_workers=2,
        history_structures=2,
    ) as rt:
        structures = {}
        for name in ("a", "b", "a", "c"):  # b is the least recently used when c ends
            wf = fanout(f"lru-{name}", shapes[name])
            wf.run(runtime=rt)
            runs[name].append(wf.last_run.run_id)
            structures[name] = wf.structure_hash
    assert len(set(structures.values())) == 3
    (b_run,) = runs["b"]
    assert run_parts(caps_db, b_run) == []
    assert not caps_db.exists(hist_structure_runs(structures["b"]))
    assert not caps_db.exists(hist_workflow_runs("lru-b"))
    assert b_run.encode() not in caps_db.lrange(HIST_ALL_RUNS, 0, -1)
    assert sorted(s.decode() for s in caps_db.hkeys(HIST_STRUCTURES)) == sorted(
        [structures["a"], structures["c"]]
    )
    for run_id in runs["a"] + runs["c"]:
        assert run_parts(caps_db, run_id) == list(HIST_PARTS), run_id
    assert_history_whole(caps_db)


def test_history_expires_unless_its_structure_runs_again(redis_server, caps_db, tmp_path):
    """Records live for the retention (plus a grace) from their structure's last run; a run
    refreshes all of its structure's records; a structure unused for the retention is dropped
    by the next run that ends, with its index entries."""
    retention_s = 1000
    keep_s = retention_s + scripts.HISTORY_EXPIRY_GRACE_S
    with dagkube.LocalRuntime(
        _db_url(redis_server, CAPS_DB),
        home=tmp_path / "home",
        max_workers=2,
        history_retention_s=retention_s,
    ) as rt:
        first = fanout("ttl-a", 2)
        first.run(runtime=rt)
        old_run = first.last_run.run_id
        for part in HIST_PARTS:
            assert keep_s - 60 < caps_db.ttl(hist_run(old_run, part)) <= keep_s, part
        for key in (
            hist_structure_runs(first.structure_hash),
            hist_workflow_runs("ttl-a"),
            HIST_ALL_RUNS,
            HIST_STRUCTURES,
            HIST_USED,
        ):
            assert keep_s - 60 < caps_db.ttl(key) <= keep_s, key
        for part in HIST_PARTS:  # as if it had been kept for most of its time already
            caps_db.expire(hist_run(old_run, part), 50)
        stale = fanout("ttl-b", 3)
        stale.run(runtime=rt)
        stale_run = stale.last_run.run_id
        # as if ttl-b had last run longer ago than the retention
        caps_db.zadd(HIST_USED, {stale.structure_hash: time.time() - retention_s - 10})
        again = fanout("ttl-a", 2)
        again.run(runtime=rt)
    for part in HIST_PARTS:
        assert keep_s - 60 < caps_db.ttl(hist_run(old_run, part)) <= keep_s, part
    assert run_parts(caps_db, stale_run) == []
    assert not caps_db.exists(hist_workflow_runs("ttl-b"))
    assert stale_run.encode() not in caps_db.lrange(HIST_ALL_RUNS, 0, -1)
    assert [s.decode() for s in caps_db.hkeys(HIST_STRUCTURES)] == [first.structure_hash]
    assert_history_whole(caps_db)


def test_a_late_record_joins_its_history_but_never_recreates_a_dropped_one(caps_db):
    """A worker that finishes after its run ended adds its record to the history, expiring
    with it; once the run was pruned, a late record creates no key."""
    run = "late-run"
    caps_db.hset(
        RunKeys(run).meta,
        mapping={
            "status": "running",
            "active": 1,
            "tasks_total": 1,
            "submitted_at": time.time() - 5,
            "workflow": "late",
            "structure_hash": "late-structure",
        },
    )
    ended = call_sync(caps_db, ForceEndCall(run_id=run, now=time.time()))
    assert ended.status == "cancelled"

    def finish_late(worker: str) -> None:
        record = json.dumps({"worker_id": worker})
        call = FinishCall(
            run_id=run,
            pool="late",
            worker_id=worker,
            worker_field=worker,
            worker_record_json=record,
            gb_s=0.1,
            cpu_s_allocated=0.1,
            cpu_s_used=0.1,
            cold=True,
            prewarmed=False,
            now=time.time(),
            run_ttl_s=60,
            history_cap=10,
            next_queue=None,
        )
        call_sync(caps_db, call)

    finish_late("w-1")
    assert caps_db.hkeys(hist_run(run, "workers")) == [b"w-1"]
    assert caps_db.ttl(hist_run(run, "workers")) > scripts.HISTORY_EXPIRY_GRACE_S
    prune = PruneStructureCall(
        namespace=None,
        structure_hash="late-structure",
        keep_runs=0,
        finished_before=None,
        dry_run=False,
        workflow=None,
    )
    removed = call_sync(caps_db, prune).removed
    assert [r.run_id for r in removed] == [run]
    assert run_parts(caps_db, run) == []
    finish_late("w-2")
    assert run_parts(caps_db, run) == []
    assert_history_whole(caps_db)


@pytest.fixture
def prune_db(redis_server) -> Iterator[tuple[str, redis.Redis]]:
    url = _db_url(redis_server, PRUNE_DB)
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url, client
    client.flushdb()
    client.close()


def test_history_prune_removes_runs_with_their_index_entries(prune_db, tmp_path):
    url, client = prune_db
    runs: dict[str, list[str]] = {"prune-a": [], "prune-b": [], "prune-c": []}
    # prune-c has prune-a's shape: one structure, two workflow names
    with dagkube.LocalRuntime(url, home=tmp_path / "home", max_workers=2) as rt:
        for name in ("prune-c", "prune-a", "prune-b", "prune-a", "prune-a", "prune-b", "prune-a"):
            wf = fanout(name, 3 if name == "prune-b" else 2)
            wf.run(runtime=rt)
            runs[name].append(wf.last_run.run_id)
    a_old, (c_run,) = runs["prune-a"][:2], runs["prune-c"]

    def prune(*args: str):
        return run_cli("history", "prune", *args, "--redis", url)

    dry = prune("--keep-runs", "2", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "Would remove 3 run(s), 4 kept." in dry.stdout
    assert all(run_id in dry.stdout for run_id in [c_run, *a_old])
    assert all(run_parts(client, r) == list(HIST_PARTS) for ids in runs.values() for r in ids)

    only_a = prune("--keep-runs", "2", "--workflow", "prune-a")
    assert only_a.returncode == 0, only_a.stderr
    assert "Removed 2 run(s), 2 kept." in only_a.stdout
    assert all(run_id in only_a.stdout for run_id in a_old) and c_run not in only_a.stdout
    assert run_parts(client, c_run) == list(HIST_PARTS)
    for run_id in a_old:
        assert run_parts(client, run_id) == []
    assert [r.decode() for r in client.lrange(hist_workflow_runs("prune-a"), 0, -1)] == list(
        reversed(runs["prune-a"][2:])
    )
    assert all(run_parts(client, r) == list(HIST_PARTS) for r in runs["prune-b"])
    assert_history_whole(client)

    # Both of prune-b's runs finished 10 days ago: --older-than 7 empties its structure.
    for run_id in runs["prune-b"]:
        client.hset(hist_run(run_id, "meta"), "finished_at", time.time() - 10 * 86400)
    old = prune("--older-than", "7")
    assert old.returncode == 0, old.stderr
    assert "Removed 2 run(s), 3 kept. Workflow structures left without runs dropped: 1." in (
        old.stdout
    )
    assert all(run_parts(client, r) == [] for r in runs["prune-b"])
    assert not client.exists(hist_workflow_runs("prune-b"))
    assert client.hlen(HIST_STRUCTURES) == client.zcard(HIST_USED) == 1
    assert_history_whole(client)

    # An index entry whose run's records expired (no run ended since) is removed too.
    for part in HIST_PARTS:
        client.delete(hist_run(runs["prune-a"][2], part))
    gone = prune("--keep-runs", "5")
    assert "Removed 0 run(s), 2 kept." in gone.stdout
    assert "Runs whose records were already gone unindexed: 1." in gone.stdout
    assert_history_whole(client)
    listing = run_cli("history", "--redis", url, "--workflow", "prune-a")
    assert listing.returncode == 0 and runs["prune-a"][3] in listing.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "nothing to prune; give --keep-runs N"),
        (["--keep-runs", "-1"], "Invalid value for '--keep-runs': -1 is not in the range x>=0"),
        (["--older-than", "soon"], "Invalid value for '--older-than': 'soon' is not a valid float"),
        (["--older-than", "nan"], "nan days is not valid: use a number of days from 0 to 36500"),
        (["--older-than", "-2"], "-2.0 days is not valid: use a number of days from 0 to 36500"),
    ],
)
def test_history_prune_refuses_bad_options(prune_db, args, expected):
    url, _client = prune_db
    result = run_cli("history", "prune", *args, "--redis", url)
    assert result.returncode == 2
    assert expected in " ".join(result.stderr.split())
