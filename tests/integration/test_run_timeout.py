"""Run timeouts: a run past its timeout always ends, recorded as cancelled in the history with
its keys expiring, whatever its workers do (none took it yet, one is busy in a long task, one
is between tasks), and the caller gets RunTimeout."""

from __future__ import annotations

import json
import math
import os
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import redis

import dagkube
from dagkube import InvalidOption, LocalRuntime, RunTimeout
from dagkube.store.keys import PoolKeys, RunKeys, hist_run, hist_workflow_runs
from dagkube.store.records import RunRecord
from tests.conftest import run_cli, wait_until

pytestmark = pytest.mark.integration


@dagkube.task
def sleep_for(seconds: float, marker: str = "") -> float:
    if marker:
        Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


@dagkube.task
def then_mark(value: float, marker: str) -> float:
    Path(marker).write_text("ran")
    return value


@dagkube.task
def step(value: int, seconds: float = 0.2) -> int:
    time.sleep(seconds)
    return value + 1


def warm_up(rt: LocalRuntime) -> None:
    """A finished run, so that an idle worker takes the next run at once (and a timeout
    that is not reached changes nothing)."""
    assert dagkube.Workflow(sleep_for(0.0), name="timeout-warm-up").run(runtime=rt, timeout=60) == 0


def ended_record(client: redis.Redis, workflow: str) -> tuple[str, RunRecord]:
    """The id and history record of the workflow's latest run (the history lists it once it
    ended)."""
    latest = client.lindex(hist_workflow_runs(workflow), 0)
    assert latest is not None, f"no run of {workflow} in the history"
    run_id = latest.decode()
    meta = client.hgetall(hist_run(run_id, "meta"))
    return run_id, RunRecord.from_hash({k.decode(): v.decode() for k, v in meta.items()})


def assert_ended_by_timeout(
    client: redis.Redis, run_id: str, record: RunRecord, timeout_text: str
) -> None:
    assert record.status == "cancelled"
    assert record.error == {"message": f"timed out after {timeout_text} (timeout)"}
    assert record.finished_at is not None and record.finished_at > record.submitted_at
    keys = RunKeys(run_id)
    assert client.lrange(keys.result, 0, -1) == [b"cancelled"]
    run_keys = list(client.scan_iter(f"{keys.prefix}:*"))  # test-only scan
    assert keys.meta.encode() in run_keys and keys.result.encode() in run_keys
    assert all(client.ttl(k) > 0 for k in run_keys), [(k, client.ttl(k)) for k in run_keys]


def queued_for(client: redis.Redis, pool: str, run_id: str) -> list[bytes]:
    keys = PoolKeys(pool)
    return [
        item
        for memory in client.smembers(keys.classes)
        for item in client.lrange(keys.queue(int(memory)), 0, -1)
        if json.loads(item)["run"] == run_id
    ]


def test_a_long_task_past_the_timeout_ends_the_run_without_its_worker(
    make_runtime, redis_client, tmp_path
):
    """The worker is busy in a 60 s task and never reaches a task boundary: after the grace
    the run is ended without it, while it still sleeps."""
    rt = make_runtime(max_workers=1)
    warm_up(rt)
    started = tmp_path / "started"
    wf = dagkube.Workflow(
        then_mark(sleep_for(60.0, str(started)), str(tmp_path / "after")), name="timeout-long"
    )
    began = time.monotonic()
    with pytest.raises(RunTimeout) as raised:
        wf.run(runtime=rt, timeout=1)
    assert time.monotonic() - began < 20  # not the task's 60 s
    run_id, record = ended_record(redis_client, "timeout-long")
    assert str(raised.value) == f"Run {run_id} timed out after 1s and was cancelled"
    assert_ended_by_timeout(redis_client, run_id, record, "1s")
    assert record.tasks_done == 0
    # The run was ended while its task still ran: its worker is alive in it.
    assert int(started.read_text()) in rt.worker_pids().values()
    assert not (tmp_path / "after").exists()


def test_a_worker_that_finishes_its_task_after_the_end_does_not_change_the_run(
    make_runtime, redis_client, tmp_path
):
    """COMPLETE and FINISH of a task that ends after the force-end: the run stays cancelled,
    nothing is marked done, stored, queued or run downstream; only the worker's own record
    (the time it spent) is added to the history."""
    rt = make_runtime(max_workers=1, cancel_grace_s=0.2)
    warm_up(rt)
    started, after = tmp_path / "started", tmp_path / "after"
    wf = dagkube.Workflow(then_mark(sleep_for(3.0, str(started)), str(after)), name="timeout-late")
    with pytest.raises(RunTimeout):
        wf.run(runtime=rt, timeout=1)
    run_id, record = ended_record(redis_client, "timeout-late")
    assert_ended_by_timeout(redis_client, run_id, record, "1s")
    assert started.exists()  # the task ran when the run was ended
    keys = RunKeys(run_id)
    ended_meta = redis_client.hgetall(keys.meta)
    ended_history = redis_client.hgetall(hist_run(run_id, "meta"))
    assert not redis_client.exists(hist_run(run_id, "workers"))

    wait_until(
        lambda: redis_client.exists(hist_run(run_id, "workers")),
        20,
        "the busy worker to finish its task and its invocation",
    )
    assert redis_client.hkeys(hist_run(run_id, "tasks")) == [b"sleep_for#0"]
    meta = redis_client.hgetall(keys.meta)
    for field in (b"status", b"finished_at", b"makespan_s", b"tasks_done", b"error"):
        assert meta.get(field) == ended_meta.get(field), field
    history = redis_client.hgetall(hist_run(run_id, "meta"))
    assert history == ended_history
    assert redis_client.lrange(keys.result, 0, -1) == [b"cancelled"]
    assert not redis_client.exists(keys.outputs) and not redis_client.exists(keys.done)
    assert queued_for(redis_client, rt.pool, run_id) == []
    assert not after.exists()
    run_keys = list(redis_client.scan_iter(f"{keys.prefix}:*"))  # test-only scan
    assert all(redis_client.ttl(k) > 0 for k in run_keys)


def test_a_run_between_tasks_stops_at_the_next_boundary(make_runtime, redis_client):
    rt = make_runtime(max_workers=1)
    warm_up(rt)
    chain = 0
    for _ in range(30):
        chain = step(chain)
    wf = dagkube.Workflow(chain, name="timeout-chain")
    with pytest.raises(RunTimeout):
        wf.run(runtime=rt, timeout=1.5)
    run_id, record = ended_record(redis_client, "timeout-chain")
    assert_ended_by_timeout(redis_client, run_id, record, "1.5s")
    assert 1 <= record.tasks_done < 30
    # Its worker stopped at a boundary and ended the run itself: its record was written first.
    assert redis_client.hlen(hist_run(run_id, "workers")) == 1


def test_a_run_no_worker_took_ends_and_its_queued_work_never_runs(
    make_runtime, redis_client, tmp_path
):
    # The worker's start-up (8 s) is far longer than the run (0.5 s + 0.2 s grace): a driver
    # stalled for seconds on a loaded machine (CI once) must not let the worker take it first.
    startup_s = 8.0
    rt = make_runtime(max_workers=1, startup_delay_s=startup_s, cancel_grace_s=0.2)
    marker = tmp_path / "ran"
    wf = dagkube.Workflow(sleep_for(0.0, str(marker)), name="timeout-no-worker")
    began = time.monotonic()
    with pytest.raises(RunTimeout) as raised:
        wf.run(runtime=rt, timeout=0.5)
    took = time.monotonic() - began
    assert took < startup_s, f"the run took {took:.1f}s to time out: the worker had started"
    run_id, record = ended_record(redis_client, "timeout-no-worker")
    assert run_id in str(raised.value) and "0.5s" in str(raised.value)
    assert_ended_by_timeout(redis_client, run_id, record, "0.5s")
    assert not redis_client.exists(hist_run(run_id, "tasks"), hist_run(run_id, "workers"))
    assert queued_for(redis_client, rt.pool, run_id) == []
    # The worker started for it (still in its start-up) serves the next run, not the old one.
    assert dagkube.Workflow(sleep_for(0.0), name="timeout-next").run(runtime=rt) == 0
    assert not marker.exists()
    assert not redis_client.exists(hist_run(run_id, "tasks"))


WORKFLOW_FILE = """\
import os
import time
from pathlib import Path

import dagkube


@dagkube.task
def sleep_for(seconds):
    Path({marker!r}).write_text(str(os.getpid()))
    time.sleep(seconds)
    return seconds


workflow = dagkube.Workflow(sleep_for(60.0), name="cli-timeout")
"""


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cli_timeout_exits_1_with_one_line_and_leaves_no_worker(
    redis_server, redis_client, tmp_path
):
    marker = tmp_path / "worker.pid"
    file = tmp_path / "slow.py"
    file.write_text(textwrap.dedent(WORKFLOW_FILE.format(marker=str(marker))))
    result = run_cli(
        "run",
        str(file),
        "--timeout",
        "1",
        env={"DAGKUBE_REDIS_URL": redis_server.url, "DAGKUBE_HOME": str(tmp_path / "home")},
        timeout=60,
    )
    run_id, record = ended_record(redis_client, "cli-timeout")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: Run {run_id} timed out after 1s and was cancelled"], result.stderr
    assert_ended_by_timeout(redis_client, run_id, record, "1s")
    wait_until(lambda: _gone(int(marker.read_text())), 10, "the worker to exit")


def test_cli_rejects_a_bad_timeout_and_documents_its_exit_code(redis_server):
    env = {"DAGKUBE_REDIS_URL": redis_server.url}
    example = str(Path(__file__).resolve().parents[2] / "examples" / "tree_reduction.py")
    for value in ("0", "nan"):
        result = run_cli("run", example, "--timeout", value, env=env)
        assert result.returncode == 2, result.stdout + result.stderr
        assert "Invalid value for '--timeout'" in result.stderr
        assert f"Timeout {float(value)!r} is not valid" in result.stderr
        assert "positive number of seconds" in result.stderr
    usage = run_cli("run", "--help")
    assert "--timeout SECONDS" in usage.stdout and "exits with code 1" in usage.stdout


class Untouched:
    """A runtime that must not be used: the timeout is checked before anything starts."""

    def __getattr__(self, name: str):
        raise AssertionError(f"runtime.{name} was used before the timeout was checked")


@pytest.mark.parametrize("value", [0, -1, -0.5, math.nan, math.inf, "30", True])
def test_a_timeout_that_is_not_a_positive_number_is_rejected(value, redis_server, tmp_path):
    wf = dagkube.Workflow(sleep_for(0.0), name="timeout-bad")
    expected = f"Timeout {value!r} is not valid: use a positive number of seconds"
    with pytest.raises(InvalidOption) as raised:
        wf.run(runtime=Untouched(), timeout=value)
    assert str(raised.value).startswith(expected)
    rt = LocalRuntime(redis_server.url, home=tmp_path / "home")
    with pytest.raises(InvalidOption) as raised:
        rt.run(wf.dag, wf.plan(), timeout_s=value)
    assert str(raised.value).startswith(expected)
    assert not rt.started


def test_a_negative_cancel_grace_is_rejected(redis_server):
    with pytest.raises(dagkube.DagkubeError, match="cancel_grace_s=-1 must be"):
        LocalRuntime(redis_server.url, cancel_grace_s=-1)
