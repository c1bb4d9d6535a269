"""A driver that dies leaves nothing behind: its workers die with it (even one inside a task
that never returns), the embedded Redis stops once no live process uses it, and the CLI
stopped with SIGTERM cleans up as on Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import psutil
import pytest
import redis

from dagkube.runtime.embedded import EmbeddedRedis
from tests.conftest import ROOT, wait_until
from tests.slow_cli import SlowRun, embedded_server, gone

pytestmark = pytest.mark.integration

DRIVER = """\
import os
import time
from pathlib import Path

import dagkube


@dagkube.task
def forever(marker):
    Path(marker).write_text(str(os.getpid()))
    while True:  # never returns, and ignores nothing: the worker must be stopped from outside
        time.sleep(0.5)


with dagkube.LocalRuntime(home={home!r}) as rt:
    dagkube.Workflow(forever({marker!r}), name="orphan-probe").run(runtime=rt)
"""


def test_a_killed_driver_leaves_no_worker_and_no_server(tmp_path):
    """Before: SIGKILL of a program holding a LocalRuntime left its worker in the task and
    the embedded redis-server running forever."""
    home, marker = tmp_path / "home", tmp_path / "started"
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(home=str(home), marker=str(marker)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("DAGKUBE_REDIS_URL", None)
    driver = subprocess.Popen([sys.executable, str(script)], env=env)
    try:
        wait_until(marker.exists, 60, "the never-returning task to start")
        worker = psutil.Process(int(marker.read_text()))
        server = embedded_server(home)
        driver.kill()
        driver.wait()
        wait_until(lambda: gone(worker), 30, "the worker to die with its driver")
        wait_until(lambda: gone(server), 15, "the embedded Redis to stop without users")
        wait_until(lambda: not (home / "server.json").exists(), 5, "the guard to forget the server")
    finally:
        if driver.poll() is None:
            driver.kill()
    # The abandoned run's keys (and the history it began) expire: its lease is not renewed.
    with EmbeddedRedis(home) as url:
        client = redis.Redis.from_url(url)
        metas = list(client.scan_iter("dk:run:orphan-probe-*:meta"))  # test-only scan
        assert len(metas) == 1 and client.hget(metas[0], "status") == b"running"
        prefix = metas[0].decode().removesuffix(":meta")
        run_keys = list(client.scan_iter(f"{prefix}:*"))
        run_id = prefix.removeprefix("dk:run:")
        history = list(client.scan_iter(f"dk:hist:r:{run_id}:*"))
        assert len(run_keys) >= 3 and history  # meta, dag, plan at least
        ttls = {key: client.ttl(key) for key in run_keys + history}
        assert all(0 < ttl <= 3600 for ttl in ttls.values()), ttls
        client.close()


def test_the_cli_stopped_by_sigterm_cancels_its_run_and_stops_what_it_started(tmp_path):
    """As `timeout 60 dagkube run ...` does: before, Python's default SIGTERM ended the CLI
    on the spot, with no clean-up (the server and workers then stayed)."""
    run = SlowRun(tmp_path)
    worker = psutil.Process(int(run.marker.read_text()))
    run.process.send_signal(signal.SIGTERM)
    code, stderr, took = run.finish(limit_s=30)
    assert code == 143, stderr
    assert "terminated: the run was cancelled" in stderr and "Traceback" not in stderr
    assert took < 20
    assert gone(worker) and gone(run.server)
    # The cancelled run is in the history of the home's server (started again to read it).
    history = subprocess.run(
        [sys.executable, "-m", "dagkube.cli", "history"],
        env=run.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert history.returncode == 0, history.stderr
    assert "cli-slow" in history.stdout and "cancelled" in history.stdout, history.stdout
