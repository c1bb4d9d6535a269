"""Per-task timeouts (`@task(timeout=...)`): a task past its timeout has its worker stopped
whatever the task does (sleeps forever, holds the interpreter), then runs again on a fresh
worker while its retries last, else the run fails with TaskTimeout."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import psutil
import pytest

import dagkube
from dagkube import InvalidWorkflow, TaskFailed
from dagkube.runtime.worker import TASK_TIMEOUT_EXIT
from dagkube.store.keys import hist_run
from tests.conftest import wait_until

pytestmark = pytest.mark.integration


@dagkube.task(timeout=1)
def hang(marker: str) -> int:
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.2)


@dagkube.task(timeout=1, retries=1)
def hang_once(marker: str) -> int:
    """Hangs on its first attempt, returns on the second."""
    if Path(marker).exists():
        return 7
    Path(marker).write_text(str(os.getpid()))
    while True:
        time.sleep(0.2)


@dagkube.task(timeout=1)
def hold_the_interpreter(marker: str) -> bool:
    """Catastrophic backtracking: the regex engine never lets the worker's event loop run, so
    the worker cannot stop itself (nor beat); the scaler has to."""
    Path(marker).write_text(str(os.getpid()))
    return re.match(r"(a+)+$", "a" * 64 + "b") is not None


@dagkube.task(timeout=30)
def quick(value: int) -> int:
    return value + 1


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_task_past_its_timeout_fails_the_run_and_its_worker_is_stopped(make_runtime, tmp_path):
    rt = make_runtime(max_workers=1)
    marker = tmp_path / "started"
    began = time.monotonic()
    with pytest.raises(TaskFailed) as raised:
        dagkube.Workflow(hang(str(marker)), name="task-timeout").run(runtime=rt)
    assert time.monotonic() - began < 20
    failure = raised.value
    assert failure.exc_type == "TaskTimeout" and failure.task_id == "hang#0"
    assert "ran past its timeout of 1s (1 of 1 attempt(s)); its worker was stopped" in str(failure)
    wait_until(lambda: gone(int(marker.read_text())), 10, "the hung worker to be gone")


def test_a_timed_out_task_runs_again_on_a_fresh_worker_while_retries_last(
    make_runtime, redis_client, tmp_path
):
    rt = make_runtime(max_workers=1)
    marker = tmp_path / "first-attempt"
    wf = dagkube.Workflow(quick(hang_once(str(marker))), name="task-timeout-retry")
    result = rt.run(wf.dag, rt.plan(wf.dag))
    assert result.status == "succeeded" and result.outputs == 8
    assert int(redis_client.hget(hist_run(result.run_id, "meta"), "task_timeouts")) == 1
    lost = [
        json.loads(raw)
        for field, raw in redis_client.hgetall(hist_run(result.run_id, "workers")).items()
        if field.endswith(b":lost")
    ]
    assert [(w["lost_task"], w["exit_code"]) for w in lost] == [("hang_once#0", TASK_TIMEOUT_EXIT)]
    assert gone(int(marker.read_text()))


def test_a_task_that_starves_its_worker_is_stopped_by_the_scaler(make_runtime, tmp_path):
    rt = make_runtime(max_workers=1)
    marker = tmp_path / "started"
    began = time.monotonic()
    with pytest.raises(TaskFailed) as raised:
        dagkube.Workflow(hold_the_interpreter(str(marker)), name="task-timeout-gil").run(runtime=rt)
    assert raised.value.exc_type == "TaskTimeout", raised.value
    assert time.monotonic() - began < 30
    wait_until(lambda: gone(int(marker.read_text())), 10, "the starved worker to be gone")


@pytest.mark.parametrize("value", [0, -1, math.nan, math.inf, 8 * 24 * 3600, "5", True])
def test_a_bad_timeout_is_refused_naming_what_is_accepted(value):
    with pytest.raises(InvalidWorkflow) as raised:
        dagkube.task(timeout=value)
    assert f"timeout={value!r} is invalid: use a number of seconds > 0" in str(raised.value)
