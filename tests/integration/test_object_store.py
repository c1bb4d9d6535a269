"""The object store for large outputs, over HTTP against moto's standalone S3 server (a real
process on a free loopback port) and on a local directory: whole runs whose large outputs go
to the store with only references in Redis, objects removed when the run's data is dropped,
none left by a completion for a run whose keys are gone, and the orphan sweep."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis.asyncio as aioredis

import dagkube
from dagkube.runtime.embedded import _free_port, default_object_dir
from dagkube.store.calls import CompleteCall, Completion, StoreCall
from dagkube.store.cleanup import delete_run_keys
from dagkube.store.connection import BulkReader
from dagkube.store.keys import RunKeys, namespaced
from dagkube.store.objects import (
    OBJECT_REF,
    ObjectStoreError,
    object_name,
    open_store,
    sweep_orphans,
)
from dagkube.store.scripts import Scripts
from tests.conftest import stop_process, wait_until

boto3 = pytest.importorskip("boto3")

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
ELEMENTS = 4 * MIB // 8  # 4 MiB of float64 per output: over the 1 MiB threshold
BUCKET = "dagkube-it"
DB = 8  # a database of its own for the script-level tests
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's standalone S3 server as a subprocess, credentials in the environment (workers
    inherit it), a bucket made; stopped at the end."""
    executable = str(Path(sys.executable).with_name("moto_server"))
    port = _free_port()
    process = subprocess.Popen(
        [executable, "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    saved = {name: os.environ.get(name) for name in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        wait_until(lambda: _answers(client), 30, "moto_server to answer")
        client.create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        stop_process(process)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _answers(client) -> bool:
    try:
        client.list_buckets()
        return True
    except Exception:  # not up yet: the deadline in wait_until bounds the wait
        return False


def listed(endpoint: str, prefix: str) -> list[str]:
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [obj["Key"] for page in pages for obj in page.get("Contents", [])]


@pytest.fixture
def s3_url(moto_endpoint: str) -> str:
    """A prefix of its own per test, so that listings see only its objects."""
    return f"s3://{BUCKET}/t-{uuid.uuid4().hex[:8]}?endpoint_url={moto_endpoint}&region=us-east-1"


# ------------------------------------------------------------------------- whole runs
@dagkube.task
def block(index: int, elements: int) -> np.ndarray:
    return np.full(elements, float(index))


@dagkube.task
def total(arrays: list[np.ndarray], store_url: str) -> tuple[float, int]:
    """The sum, and how many objects the store holds while this fan-in runs."""
    from dagkube.store.objects import open_store as opened

    store = opened(store_url)
    held = sum(1 for _, prefix in store.run_prefixes() for _ in _objects(store, prefix))
    return float(sum(float(a.sum()) for a in arrays)), held


def _objects(store, prefix: str) -> list[str]:
    if hasattr(store, "root"):  # a directory
        return [p.name for p in (store.root / prefix).iterdir() if not p.name.startswith(".")]
    return list(store._listed(store.prefix + prefix))


def fan_in(store_url: str) -> dagkube.Workflow:
    blocks = [block(i, ELEMENTS) for i in range(1, 5)]
    return dagkube.Workflow(total(blocks, store_url), name="it-object-store")


def run_through(make_runtime, store_url: str) -> tuple[tuple[float, int], str]:
    runtime = make_runtime(object_store=store_url, object_threshold_bytes=MIB, max_workers=2)
    wf = fan_in(store_url)
    result = wf.run(runtime=runtime, planner="wukong")
    return result, wf.last_run.run_id


def test_a_fan_in_through_s3(make_runtime, s3_url, moto_endpoint, redis_client):
    (value, held), run_id = run_through(make_runtime, s3_url)
    assert value == pytest.approx(ELEMENTS * (1 + 2 + 3 + 4))
    # Wukong hands three of the four blocks to other workers: at least those were objects
    # while the fan-in ran; none is left once the driver had the result.
    assert held >= 3
    prefix = s3_url.split("/", 3)[3].split("?")[0]
    assert listed(moto_endpoint, prefix) == []
    assert not redis_client.keys(RunKeys(run_id).output("*"))


def test_a_fan_in_through_a_directory(make_runtime, tmp_path):
    url = (tmp_path / "objects").as_uri()
    (value, held), _ = run_through(make_runtime, url)
    assert value == pytest.approx(ELEMENTS * (1 + 2 + 3 + 4))
    assert held >= 3
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []


@dagkube.task
def scaled(array: np.ndarray, factor: float, store_url: str) -> tuple[float, int, bool]:
    """The scaled sum, the objects the store holds while this runs, and whether the input
    came back writeable (as a bytes-read one does)."""
    from dagkube.store.objects import open_store as opened

    store = opened(store_url)
    held = sum(1 for _, prefix in store.run_prefixes() for _ in _objects(store, prefix))
    return float((array * factor).sum()), held, array.flags.writeable


def test_large_constants_are_objects_read_in_place_and_gone_with_the_run(
    make_runtime, tmp_path, redis_client
):
    url = (tmp_path / "objects").as_uri()
    runtime = make_runtime(object_store=url, object_threshold_bytes=MIB, max_workers=1)
    data = np.ones(ELEMENTS)  # 4 MiB: a constant of the DAG, over the threshold
    wf = dagkube.Workflow([scaled(data, 2.0, url), scaled(data, 3.0, url)], name="it-consts")
    assert len(wf.dag.constants) == 1
    (first, second) = wf.run(runtime=runtime, planner="wukong")
    assert (first[0], second[0]) == (2.0 * ELEMENTS, 3.0 * ELEMENTS)
    # the constant was an object while the run ran, and came back writeable
    assert first[1] >= 1 and second[1] >= 1 and first[2] and second[2]
    stored = redis_client.hvals(RunKeys(wf.last_run.run_id).constants)
    assert stored == []  # dropped with the run's data, and its object with it
    assert [p for p in (tmp_path / "objects").rglob("*") if p.is_file()] == []


def test_the_embedded_server_keeps_large_outputs_in_a_directory_of_its_own(tmp_path):
    home = tmp_path / "home"
    with dagkube.LocalRuntime(home=home, max_workers=2) as runtime:
        assert runtime.objects is not None
        directory = default_object_dir(home, in_memory=not runtime.enforced)
        assert runtime.objects.url == directory.as_uri()
        assert (directory.parent.stat().st_mode & 0o777) == 0o700
        value, held = fan_in(runtime.objects.url).run(runtime=runtime, planner="wukong")
        assert value == pytest.approx(ELEMENTS * (1 + 2 + 3 + 4)) and held >= 3
        assert [p for p in directory.rglob("*") if p.is_file()] == []
    # The server stopped with its last user: no run of it can go on, its directory goes too.
    assert not directory.parent.exists()


# ------------------------------------------------------------------ the scripts' side
@pytest.fixture
async def redis(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture(params=["file", "s3"])
def store_url(request, tmp_path) -> str:
    if request.param == "file":
        return (tmp_path / "objects").as_uri()
    return request.getfixturevalue("s3_url")


@pytest.fixture
def scripts(redis, redis_server, store_url) -> Iterator[Scripts]:
    store = open_store(store_url, MIB)
    bulk = BulkReader(redis_server.url.rsplit("/", 1)[0] + f"/{DB}", objects=store)
    yield Scripts(redis, bulk=bulk)
    bulk.close()


async def start_run(redis: aioredis.Redis, name: str) -> str:
    run = namespaced("team-c", f"{name}-{uuid.uuid4().hex[:6]}")
    await redis.hset(
        RunKeys(run).meta,
        mapping={"status": "running", "active": 1, "tasks_total": 3, "tasks_done": 0},
    )
    return run


def complete(run: str, task_id: str, output: bytes) -> CompleteCall:
    return CompleteCall(
        run_id=run,
        pool=namespaced("team-c", "wf"),
        worker_id="w1",
        logical_worker=None,
        memory_mib=512,
        run_ttl_s=900,
        completions=(Completion(task_id, "{}", task_id, output, 5.0),),
    )


BIG = os.urandom(MIB) * 2  # 2 MiB: over the threshold
MIDDLE = b"m" * (MIB // 2)  # written apart, but under the threshold: stays in Redis


async def test_a_large_output_becomes_an_object_and_a_reference(redis, scripts):
    run = await start_run(redis, "ref")
    keys = RunKeys(run)
    assert (await scripts.complete(complete(run, "a#1", BIG))).running
    await scripts.store(StoreCall(run, {"b": MIDDLE}, 900))
    stored = await redis.get(keys.output("a#1"))
    assert stored.startswith(OBJECT_REF) and len(stored) < 200
    assert await redis.get(keys.output("b")) == MIDDLE
    assert bytes(scripts.bulk.objects.get(object_name(run, "a#1")) or b"") == BIG
    values = await scripts.bulk.hmget_many([(keys.outputs, ["a#1", "b", "none"])])
    assert [[None if v is None else bytes(v) for v in row] for row in values] == [
        [BIG, MIDDLE, None]
    ]
    (one,) = await scripts.bulk.hmget_many([(keys.outputs, ["a#1"])])
    assert [bytes(v) for v in one] == [BIG]


async def test_no_object_outlives_a_run_whose_keys_are_gone(redis, scripts):
    run = await start_run(redis, "gone")
    await delete_run_keys(redis, run)
    assert (await scripts.complete(complete(run, "a", BIG))).status == "missing"
    assert (await scripts.store(StoreCall(run, {"b": BIG}, 900))).status == "missing"
    objects = scripts.bulk.objects
    assert objects.get(object_name(run, "a")) is None
    assert objects.get(object_name(run, "b")) is None


async def test_the_sweep_removes_the_objects_of_runs_without_keys(redis, scripts):
    alive, ended = await start_run(redis, "alive"), await start_run(redis, "ended")
    for run in (alive, ended):
        await scripts.complete(complete(run, "a", BIG))
    await delete_run_keys(redis, ended)  # expired, say
    objects = scripts.bulk.objects
    assert await sweep_orphans(redis, objects) == [ended]
    assert objects.get(object_name(ended, "a")) is None
    assert bytes(objects.get(object_name(alive, "a")) or b"") == BIG


async def test_a_reader_without_the_store_says_so(redis, scripts, redis_server):
    run = await start_run(redis, "nostore")
    await scripts.complete(complete(run, "a", BIG))
    plain = BulkReader(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    try:
        with pytest.raises(ObjectStoreError, match=r"object store .* DAGKUBE_OBJECT_STORE_URL"):
            await plain.hmget_many([(RunKeys(run).outputs, ["a"])])
    finally:
        plain.close()


def test_a_missing_bucket_no_credentials_and_no_endpoint_are_named(moto_endpoint, monkeypatch):
    url = f"s3://no-such-bucket/p?endpoint_url={moto_endpoint}"
    with pytest.raises(ObjectStoreError, match="bucket 'no-such-bucket' does not exist"):
        open_store(url)
    port = _free_port()
    with pytest.raises(ObjectStoreError, match="cannot reach the endpoint"):
        open_store(f"s3://{BUCKET}?endpoint_url=http://127.0.0.1:{port}")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(ObjectStoreError, match=r"no AWS credentials .*AWS_ACCESS_KEY_ID"):
        open_store(f"s3://{BUCKET}?endpoint_url={moto_endpoint}")
