"""`dagkube run` of a slow workflow in the background, on its own embedded Redis: the probe of
the tests that stop, kill or interrupt things under a running CLI."""

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

SLOW = ROOT / "tests" / "data" / "slow_workflow.py"


def embedded_server(home: Path) -> psutil.Process:
    """The redis-server of a dagkube home (the embedded server runs in its data directory)."""
    servers = [
        p
        for p in psutil.process_iter(["cmdline", "cwd"])
        if "redis-server" in " ".join(p.info["cmdline"] or [])
        and (p.info["cwd"] or "").startswith(str(home))
    ]
    assert len(servers) == 1, servers
    return servers[0]


def gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class SlowRun:
    """`dagkube run` of a 30 s workflow, started once its first task runs (``marker`` holds
    that worker's pid)."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.home = tmp_path / "home"
        self.marker = tmp_path / "started"
        env = dict(os.environ, DAGKUBE_HOME=str(self.home), DAGKUBE_TEST_MARKER=str(self.marker))
        env.pop("DAGKUBE_REDIS_URL", None)
        self.env = env
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagkube.cli", "run", str(SLOW), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(self.marker.exists, 60, "a task of the slow workflow to start")
        self.server = embedded_server(self.home)

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
        wait_until(lambda: gone(self.server), 10, "the embedded Redis to be stopped")
