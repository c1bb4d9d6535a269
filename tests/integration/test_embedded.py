"""The embedded default: a private redis-server under $DAGKUBE_HOME, persistent and shared."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import pytest
import redis

import dagkube
from dagkube.metrics.history import list_runs
from dagkube.runtime.embedded import AOF_FILE, RDB_FILE, EmbeddedRedis, _ping, find_redis_server
from dagkube.runtime.embedded import pid_alive as _alive
from dagkube.store.connection import connect
from tests.conftest import ROOT, wait_until
from tests.tasks import add

pytestmark = pytest.mark.integration


def server_pid(home) -> int:
    return json.loads((home / "server.json").read_text())["pid"]


def test_history_survives_between_separate_runtimes(tmp_path):
    home = tmp_path / "home"
    wf = dagkube.Workflow(add(add(1, 2), 3), name="emb-persist")
    with dagkube.LocalRuntime(home=home, max_workers=2) as rt:
        assert wf.run(runtime=rt) == 6
        first_run = wf.last_run.run_id
        pid = server_pid(home)
    assert not _alive(pid), "the last user must stop the embedded server"
    assert not (home / "server.json").exists()

    with dagkube.LocalRuntime(home=home, max_workers=2) as rt:
        runs = rt.call(list_runs(rt.redis, workflow="emb-persist"))
        assert [r.run_id for r in runs] == [first_run]
        assert runs[0].status == "succeeded"


def test_two_users_share_one_server_and_the_last_stops_it(tmp_path):
    first, second = EmbeddedRedis(tmp_path), EmbeddedRedis(tmp_path)
    url = first.acquire()
    assert second.acquire() == url
    pid = server_pid(tmp_path)
    first.release()
    assert _alive(pid) and _ping(url), "a server still in use must keep running"
    second.release()
    assert not _alive(pid)


def test_stale_server_file_is_replaced(tmp_path):
    (tmp_path / "server.json").write_text(json.dumps({"pid": 999999, "url": "redis://x:1/0"}))
    with EmbeddedRedis(tmp_path) as url:
        assert _ping(url)
        assert server_pid(tmp_path) != 999999


def test_concurrent_cli_processes_share_one_home(tmp_path):
    env = dict(os.environ, DAGKUBE_HOME=str(tmp_path / "home"))
    env.pop("DAGKUBE_REDIS_URL", None)
    example = str(ROOT / "examples" / "tree_reduction.py")
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "dagkube.cli", "run", example, "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    outputs = [p.communicate(timeout=120) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr
        assert json.loads(stdout)["verified"] is True
    assert not (tmp_path / "home" / "server.json").exists()

    async def count():
        with EmbeddedRedis(tmp_path / "home") as url:
            client = await connect(url)
            try:
                return len(await list_runs(client, workflow="tree-reduction"))
            finally:
                await client.aclose()

    assert asyncio.run(count()) == 3


def test_a_home_from_before_the_append_only_file_keeps_its_history(tmp_path):
    """A data directory with only the snapshot older versions wrote: the server loads it (with
    appendonly on from the start it would begin empty), writes its append-only file, and the
    next start loads that."""
    data = tmp_path / "home" / "redis"
    data.mkdir(parents=True)
    old = subprocess.Popen(
        [
            find_redis_server(),
            *("--port", "0", "--unixsocket", str(data / "old.sock"), "--dir", str(data)),
            *("--dbfilename", RDB_FILE, "--appendonly", "no", "--save", ""),
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(data / "old.sock"))
    wait_until(lambda: (data / "old.sock").exists() and client.ping(), 15, "the old server")
    client.set("dk:probe", "kept")
    client.shutdown(save=True)
    old.wait(timeout=10)
    assert not (data / AOF_FILE).exists()
    for _ in range(2):  # the snapshot, then the append-only file
        embedded = EmbeddedRedis(tmp_path / "home")
        store = redis.Redis.from_url(embedded.acquire())
        try:
            assert store.get("dk:probe") == b"kept"
            assert store.config_get("appendonly") == {"appendonly": "yes"}
        finally:
            store.close()
            embedded.release()
        assert (data / AOF_FILE).exists()
