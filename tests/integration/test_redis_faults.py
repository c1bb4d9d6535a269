"""Redis faults seen from the CLI: a server that stops answering (SIGSTOP) or dies mid-run
gives one clear line and exit 3 within a bounded time, Ctrl-C still works, and the embedded
server the command started is gone afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.integration

SLOW = ROOT / "tests" / "data" / "slow_workflow.py"


class SlowRun:
    """`dagkube run` of a 30 s workflow on its own embedded Redis, started in the background."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.home = tmp_path / "home"
        marker = tmp_path / "started"
        env = dict(os.environ, DAGKUBE_HOME=str(self.home), DAGKUBE_TEST_MARKER=str(marker))
        env.pop("DAGKUBE_REDIS_URL", None)
        self.began = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagkube.cli", "run", str(SLOW), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(marker.exists, 60, "a task of the slow workflow to start")
        servers = [
            p
            for p in psutil.process_iter(["cmdline", "cwd"])
            if "redis-server" in " ".join(p.info["cmdline"] or [])
            and (p.info["cwd"] or "").startswith(str(self.home))
        ]
        assert len(servers) == 1, servers
        self.server = servers[0]

    def finish(self, limit_s: float) -> tuple[int, str, float]:
        """Exit code, stderr and seconds from now until the CLI exited (killed past limit_s)."""
        began = time.monotonic()
        try:
            _, stderr = self.process.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            pytest.fail(f"the CLI was still running {limit_s:g}s later")
        finally:
            if self.server.is_running():
                self.server.send_signal(signal.SIGCONT)
        return self.process.returncode, stderr, time.monotonic() - began

    def assert_server_gone(self) -> None:
        wait_until(
            lambda: not self.server.is_running() or self.server.status() == psutil.STATUS_ZOMBIE,
            10,
            "the embedded Redis to be stopped",
        )


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
