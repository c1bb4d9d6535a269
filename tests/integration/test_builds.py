"""Builds as a build Pod runs them: ``python -m dagkube.kubernetes.build`` (a real process)
stores the DAG with a namespace's worker credential on a real redis-server, and the operator's
reader (``dagkube_operator.source``) takes it back as data, with its own credential, never
unpickling. Hostile sources cannot forge a reason or slip a pickle into the operator; the DAG
read back runs to the right result on workers of the namespace.

The Pod around the build (no token, limits, deadline, deletion) is tested on the local control
plane: tests/cluster/test_builds.py."""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

import dagkube
from dagkube.kubernetes.build import result_key
from dagkube.store.connection import connect
from dagkube_operator.reasons import Reason
from dagkube_operator.source import _read, build_key
from dagkube_operator.spec import Source, SpecError
from examples import tree_reduction
from tests.conftest import RedisServer
from tests.integration.test_redis_acl import AclRedis, run_in_namespace

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
NS = "builders"
PWNED = "dk:pwned"  # what the payload sets when something unpickles it


@pytest.fixture(scope="module")
def users(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AclRedis]:
    server = RedisServer(tmp_path_factory.mktemp("build-redis"))
    setup = AclRedis.with_users(server, NS)
    yield setup
    server.stop()


def run_build(users: AclRedis, request: dict, uid: str) -> tuple[subprocess.CompletedProcess, str]:
    """The build Pod's command, with the Pod's environment: the namespace's credential only."""
    key = build_key(NS, uid)
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": str(ROOT),
        "DAGKUBE_REDIS_URL": users.worker_url(NS),
        "DAGKUBE_BUILD_REQUEST": json.dumps(request),
        # what a careless operator would hand its builds: the test checks it does not leak
        "HOME": "/tmp",
    }
    done = subprocess.run(
        [sys.executable, "-m", "dagkube.kubernetes.build", "--key", key],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, key


def read_back(users: AclRedis, source: Source, key: str) -> dagkube.dag.DagSpec:
    """What the operator does with the outcome: its own credential, no unpickling."""

    async def read() -> dagkube.dag.DagSpec:
        operator = await connect(users.operator_url)
        try:
            outcome = await operator.get(result_key(key))
            assert outcome is not None, "the build wrote no outcome"
            return await _read(operator, source, key, outcome)
        finally:
            await operator.aclose()

    return asyncio.run(read())


@pytest.fixture
def no_unpickling(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """In this process (the operator's side), unpickling anything fails the test (until the
    returned patch is undone)."""

    def refuse(*_args, **_kwargs):
        raise AssertionError("the operator's side unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    return monkeypatch


def test_a_module_build_is_read_back_as_data_and_runs(users, tmp_path, no_unpickling):
    source = Source(module="examples.tree_reduction:build", args={})
    done, key = run_build(users, {"module": source.module, "args": source.args}, "uid-module")
    assert done.returncode == 0, done.stderr
    dag = read_back(users, source, key)
    expected = tree_reduction.build().dag
    assert (dag.structure_hash, list(dag.tasks)) == (expected.structure_hash, list(expected.tasks))
    assert dag.functions.keys() == expected.functions.keys()
    # the workers (which do unpickle: they run the user's code) get it and run it right
    no_unpickling.undo()
    workflow = SimpleNamespace(dag=dag, name=dag.name, structure_hash=dag.structure_hash)
    ran = asyncio.run(run_in_namespace(users, NS, workflow, "wukong", tmp_path / "logs"))
    assert ran.status == "succeeded", ran.logs
    assert ran.outputs == sum(tree_reduction.LEAVES)


@pytest.mark.parametrize(
    ("request_", "reason", "words"),
    [
        ({"module": "nosuch.module:build", "args": {}}, Reason.MODULE_NOT_FOUND, "nosuch"),
        ({"module": "examples.tree_reduction:nothing"}, Reason.FUNCTION_NOT_FOUND, "nothing"),
        ({"inline": "x = 1\n", "name": "empty"}, Reason.INVALID_INLINE_SOURCE, "workflow"),
        ({"inline": "import sys\nsys.exit(4)\n"}, Reason.INVALID_INLINE_SOURCE, "exit"),
        ({"inline": "raise RuntimeError('boom')\n"}, Reason.INVALID_INLINE_SOURCE, "boom"),
    ],
)
def test_a_failed_build_reports_its_reason(users, request_, reason, words, no_unpickling):
    source = Source(module=request_.get("module"), inline=request_.get("inline"))
    done, key = run_build(users, request_, f"uid-fail-{reason.value.lower()}")
    assert done.returncode == 3
    with pytest.raises(SpecError) as caught:
        read_back(users, source, key)
    assert caught.value.reason is reason, caught.value
    assert words in str(caught.value)


# Inline sources that act after the build stored its DAG (atexit runs once main returned):
# they overwrite what the operator will read with their own bytes.
FORGE_REASON = """
import atexit, json, os, redis, dagkube
from tests.tasks import add
workflow = dagkube.Workflow(add(1, 2), name="forger")
def forge():
    client = redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"])
    client.set("{key}:result", json.dumps({{"reason": "Succeeded", "message": "all good"}}))
atexit.register(forge)
"""

PLANT_PICKLE = """
import atexit, os, redis, dagkube
from tests.tasks import add
workflow = dagkube.Workflow(add(1, 2), name="planter")
def plant():
    client = redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"])
    client.set("{key}", {payload!r})
atexit.register(plant)
"""


class Payload:
    """When unpickled, sets PWNED with the credential of whoever unpickles it."""

    def __reduce__(self):
        code = (
            "import os, redis; "
            f"redis.Redis.from_url(os.environ['DAGKUBE_PROBE_URL']).set({PWNED!r}, '1')"
        )
        return (exec, (code,))


def test_a_build_cannot_forge_its_reason(users):
    key = build_key(NS, "uid-forge")
    done, _ = run_build(users, {"inline": FORGE_REASON.format(key=key)}, "uid-forge")
    assert done.returncode == 0, done.stderr
    with pytest.raises(SpecError) as caught:
        read_back(users, Source(inline="x"), key)
    assert caught.value.reason is Reason.BUILD_FAILED and "all good" in str(caught.value)


def test_a_pickle_planted_by_the_build_never_runs_in_the_operator(users, monkeypatch):
    admin = users.admin()
    admin.delete(PWNED)
    payload = pickle.dumps(Payload())
    # the payload works: unpickled where DAGKUBE_PROBE_URL is set, it sets the key
    monkeypatch.setenv("DAGKUBE_PROBE_URL", users.server.url)
    pickle.loads(payload)
    assert admin.get(PWNED) == b"1"
    admin.delete(PWNED)
    key = build_key(NS, "uid-plant")
    done, _ = run_build(
        users, {"inline": PLANT_PICKLE.format(key=key, payload=payload)}, "uid-plant"
    )
    assert done.returncode == 0, done.stderr
    assert admin.get(key) == payload  # planted where the description was
    with pytest.raises(SpecError) as caught:
        read_back(users, Source(inline="x"), key)
    assert caught.value.reason is Reason.BUILD_FAILED
    assert "not a dagkube DAG description" in str(caught.value)
    assert admin.get(PWNED) is None


def test_the_build_reaches_only_its_namespace(users):
    source = """
import os, redis, dagkube
from tests.tasks import add
client = redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"])
found = {}
for name, call in [
    ("config", lambda: client.config_get("requirepass")),
    ("flushall", lambda: client.flushall()),
    ("other namespace", lambda: client.get("dk:ns:other:build:x")),
    ("stored DAG", lambda: client.get("dk:dag:0123456789abcdef")),
    ("operator keys", lambda: client.smembers("dk:namespaces")),
]:
    try:
        call()
        found[name] = "allowed"
    except redis.exceptions.NoPermissionError:
        found[name] = "refused"
client.set("dk:ns:builders:probe", repr(found))
workflow = dagkube.Workflow(add(1, 2), name="prober")
"""
    done, _ = run_build(users, {"inline": source}, "uid-probe")
    assert done.returncode == 0, done.stderr
    found = users.admin().get(f"dk:ns:{NS}:probe").decode()
    assert found == repr(
        {
            "config": "refused",
            "flushall": "refused",
            "other namespace": "refused",
            "stored DAG": "refused",
            "operator keys": "refused",
        }
    )
