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
BLIP = ROOT / "tests" / "data" / "blip_workflow.py"  # ~3 s; its first task announces itself


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


def workers_of(home: Path) -> list[psutil.Process]:
    """Worker processes still running for a dagkube home."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            worker = "dagkube.worker" in " ".join(proc.info["cmdline"] or [])
            if worker and not gone(proc) and proc.environ().get("DAGKUBE_HOME") == str(home):
                found.append(proc)
        except psutil.Error:
            continue
    return found


class SlowRun:
    """`dagkube run` of a workflow (default: 30 s), started once its first task runs
    (``marker`` holds that worker's pid), on its own embedded Redis or on ``server`` (a
    redis-server process the test owns, reached at ``redis_url``)."""

    def __init__(
        self,
        tmp_path: Path,
        *args: str,
        workflow: Path = SLOW,
        redis_url: str | None = None,
        server: psutil.Process | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.home = tmp_path / "home"
        self.marker = tmp_path / "started"
        self.env = dict(
            os.environ,
            DAGKUBE_HOME=str(self.home),
            DAGKUBE_TEST_MARKER=str(self.marker),
            **(env or {}),
        )
        self.env.pop("DAGKUBE_REDIS_URL", None)
        if redis_url:
            self.env["DAGKUBE_REDIS_URL"] = redis_url
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dagkube.cli", "run", str(workflow), *args],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(self.marker.exists, 60, "a task of the workflow to start")
        self.server = server or embedded_server(self.home)

    def finish(self, limit_s: float) -> tuple[int, str, float]:
        """Exit code, stderr and seconds from now until the CLI exited (killed past limit_s)."""
        code, _, stderr, took = self.finish_with_output(limit_s)
        return code, stderr, took

    def finish_with_output(self, limit_s: float) -> tuple[int, str, str, float]:
        """Exit code, stdout, stderr and seconds from now until the CLI exited."""
        began = time.monotonic()
        try:
            stdout, stderr = self.process.communicate(timeout=limit_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.communicate()
            pytest.fail(f"the CLI was still running {limit_s:g}s later")
        finally:
            if not gone(self.server):
                self.server.send_signal(signal.SIGCONT)
        return self.process.returncode, stdout, stderr, time.monotonic() - began

    def assert_server_gone(self) -> None:
        wait_until(lambda: gone(self.server), 10, "the embedded Redis to be stopped")
