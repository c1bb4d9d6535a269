"""Redis faults seen from the CLI: a server that stops answering (SIGSTOP) or dies mid-run
gives one clear line and exit 3 within a bounded time, Ctrl-C still works, and the embedded
server the command started is gone afterwards."""

from __future__ import annotations

import signal

import pytest

from tests.slow_cli import SlowRun

pytestmark = pytest.mark.integration


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Lost the connection to Redis at redis://" in errors[0], stderr
    assert ":***@" in errors[0]  # the password is not printed


def test_a_redis_that_stops_answering_ends_the_command_with_exit_3(tmp_path):
    """Before: the CLI waited forever on the stopped server, `--timeout` did not fire."""
    run = SlowRun(tmp_path, "--timeout", "5")
    run.server.send_signal(signal.SIGSTOP)
    code, stderr, took = run.finish(limit_s=60)
    assert code == 3, stderr
    assert_one_error_line(stderr)
    assert "Timeout reading" in stderr
    assert took < 40, took  # read timeout (10 s) + bounded clean-up steps
    run.assert_server_gone()


def test_ctrl_c_works_while_redis_does_not_answer(tmp_path):
    run = SlowRun(tmp_path)
    run.server.send_signal(signal.SIGSTOP)
    run.process.send_signal(signal.SIGINT)
    code, stderr, took = run.finish(limit_s=40)
    assert code == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "cannot cancel run" in stderr and "no answer within 3s" in stderr
    assert took < 25, took
    run.assert_server_gone()


def test_redis_killed_mid_run_gives_one_line_and_exit_3(tmp_path):
    """Before: a 60-line traceback from inside redis-py, and exit 1."""
    run = SlowRun(tmp_path)
    run.server.send_signal(signal.SIGKILL)
    code, stderr, took = run.finish(limit_s=40)
    assert code == 3, stderr
    assert_one_error_line(stderr)
    assert took < 25, took
