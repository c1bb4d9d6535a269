"""The data plane on a real Redis: large outputs written under keys of their own apart from the
COMPLETE and STORE scripts (and never left behind by a run that is over), read back from
wherever they lie, and NumPy outputs serialized with out-of-band buffers that come back
writeable, through whole runs on worker processes."""

from __future__ import annotations

import pickle
from collections.abc import AsyncIterator, Iterator
from itertools import pairwise

import numpy as np
import pytest
import redis.asyncio as aioredis

import dagkube
from dagkube.runtime.inputs import OOB_MAGIC, deserialize, serialize
from dagkube.store.calls import (
    OUTPUT_INLINE_MAX_BYTES,
    CompleteCall,
    Completion,
    Downstream,
    RenewCall,
    StoreCall,
)
from dagkube.store.cleanup import delete_run_keys, drop_run_data
from dagkube.store.connection import READ_BATCH_BYTES, BulkReader
from dagkube.store.keys import RunKeys, hist_run, namespaced
from dagkube.store.records import TaskRecord
from dagkube.store.scripts import Scripts

pytestmark = pytest.mark.integration

DB = 7  # a database of its own: the tests look at every key in it
NAMESPACE = "team-b"
POOL = namespaced(NAMESPACE, "wf-1")
LARGE = b"x" * (OUTPUT_INLINE_MAX_BYTES + 1)
RUN_TTL_S = 900


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


@pytest.fixture
def scripts(redis, redis_server) -> Iterator[Scripts]:
    """The scripts as a worker has them: large outputs go on the synchronous connection."""
    bulk = BulkReader(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    yield Scripts(redis, bulk=bulk)
    bulk.close()


async def start_run(redis: aioredis.Redis, name: str) -> str:
    run = namespaced(NAMESPACE, name)
    await redis.hset(
        RunKeys(run).meta,
        mapping={"status": "running", "active": 1, "tasks_total": 3, "tasks_done": 0},
    )
    return run


def complete(run: str, task_id: str, output: bytes | None) -> CompleteCall:
    return CompleteCall(
        run_id=run,
        pool=POOL,
        worker_id="w1",
        logical_worker=None,
        memory_mib=512,
        run_ttl_s=RUN_TTL_S,
        completions=(
            Completion(
                task_id,
                "{}",
                task_id,
                output,
                5.0,
                (Downstream("sum", dependencies=2, memory_mib=512, preload_host="h"),),
            ),
        ),
    )


async def run_keys(redis: aioredis.Redis, run: str) -> list[bytes]:
    return sorted(await redis.keys(f"{RunKeys(run).prefix}*"))


async def test_a_large_output_gets_a_key_of_its_own_and_a_small_one_rides_on_the_call(
    redis, scripts
):
    run = await start_run(redis, "apart")
    keys = RunKeys(run)
    large, small = complete(run, "a", LARGE), complete(run, "b", b"small")

    # The script's arguments carry the small output, not the large one.
    def carried(call, value: bytes) -> bool:
        return any(isinstance(arg, bytes) and value in arg for arg in call.encode())

    assert not carried(large, LARGE) and carried(small, b"small")
    assert (await scripts.complete(large)).running
    assert (await scripts.complete(small)).running
    assert await redis.hgetall(keys.outputs) == {b"b": b"small"}
    # The large one is a key of the run's (listed for its end), living as long as the run.
    assert await redis.get(keys.output("a")) == LARGE
    assert await redis.smembers(keys.keyset) >= {keys.output("a").encode()}
    assert await redis.ttl(keys.output("a")) == -1
    # Both count as stored: the fan-in's host pre-loads both, and its input count is done.
    assert await redis.lrange(keys.preload("h"), 0, -1) == [b"a", b"b"]
    assert await redis.hget(keys.dep_counts, "sum") == b"2"


async def test_a_large_output_follows_the_lease_of_a_live_run(redis, scripts):
    """A live run's keys expire one run TTL after its last renewal: a large output's key is
    given the run's lease when taken up, and renewed with the run's other keys."""
    run = await start_run(redis, "leased")
    keys = RunKeys(run)
    await redis.hset(keys.meta, "ttl_s", 300)
    await redis.expire(keys.meta, 60)
    await scripts.complete(complete(run, "a", LARGE))
    assert 0 < await redis.ttl(keys.output("a")) <= 60
    assert (await scripts.renew(RenewCall(run, shortest_lease_s=1.0))).renewed
    assert 60 < await redis.ttl(keys.output("a")) <= 300


async def test_the_first_completion_of_a_task_keeps_its_output(redis, scripts):
    run = await start_run(redis, "dup")
    await scripts.complete(complete(run, "a", LARGE))
    again = await scripts.complete(complete(run, "a", LARGE.replace(b"x", b"y")))
    assert again.duplicate
    assert await redis.get(RunKeys(run).output("a")) == LARGE


async def test_no_output_outlives_a_run_whose_keys_were_deleted(redis, scripts):
    """A worker completing (or storing) after its run's keys were deleted (one UNLINK of
    every key) must not leave a large output's key behind, nor a hash STORE made anew."""
    run = await start_run(redis, "deleted")
    await scripts.complete(complete(run, "a", LARGE))
    await delete_run_keys(redis, run)
    assert await run_keys(redis, run) == []
    reply = await scripts.complete(complete(run, "b", LARGE))
    assert reply.status == "missing"
    stored = await scripts.store(StoreCall(run, {"c": LARGE, "d": b"small"}, RUN_TTL_S))
    assert stored.status == "missing"
    assert await run_keys(redis, run) == []


async def test_an_output_written_apart_but_never_taken_up_expires(redis, scripts):
    """Should the script never run after the SET (the connection lost between the two), the
    output's own key still ends: it is written with the run's TTL."""
    run = await start_run(redis, "orphan")
    key = RunKeys(run).output("a")
    await scripts.bulk.set_then_script([(key, LARGE)], RUN_TTL_S, "return 1", [], [])
    assert 0 < await redis.ttl(key) <= RUN_TTL_S


async def test_a_late_output_of_an_ended_run_expires_with_it(redis, scripts):
    """An ended run's outputs have a TTL and may be what its driver is fetching: a lost
    worker's late completion leaves them, and what it writes anew expires with the run."""
    run = await start_run(redis, "ended")
    keys = RunKeys(run)
    await scripts.complete(complete(run, "a", LARGE))
    await redis.hset(keys.meta, "status", "succeeded")
    for key in await run_keys(redis, run):
        await redis.expire(key, 600)
    late = await scripts.complete(complete(run, "a", LARGE))
    assert late.status == "succeeded"
    assert await redis.get(keys.output("a")) == LARGE
    await drop_run_data(redis, run)  # the driver dropped the run's data
    assert not await redis.exists(keys.output("a"))
    await scripts.complete(complete(run, "a", LARGE))
    await scripts.store(StoreCall(run, {"b": LARGE, "c": b"small"}, RUN_TTL_S))
    assert await redis.hgetall(keys.outputs) == {b"c": b"small"}
    assert {keys.output("a").encode(), keys.output("b").encode()} <= set(await run_keys(redis, run))
    assert all([0 < await redis.ttl(key) <= 600 for key in await run_keys(redis, run)])


async def test_store_keeps_small_outputs_in_the_hash_and_large_ones_apart(redis, scripts):
    run = await start_run(redis, "store")
    keys = RunKeys(run)
    call = StoreCall(run, {"a": LARGE, "b": b"small", "c": LARGE + b"c"}, RUN_TTL_S)
    assert LARGE not in call.encode() and b"small" in call.encode()
    assert (await scripts.store(call)).status == "running"
    assert await redis.hgetall(keys.outputs) == {b"b": b"small"}
    assert await redis.mget([keys.output("a"), keys.output("c")]) == [LARGE, LARGE + b"c"]
    assert [await redis.ttl(keys.output(t)) for t in "ac"] == [-1, -1]
    assert await redis.smembers(keys.keyset) == {keys.output(t).encode() for t in "ac"}


async def test_a_large_output_survives_a_flushed_script_cache(redis, scripts):
    run = await start_run(redis, "noscript")
    await scripts.complete(complete(run, "a", b"small"))  # registered and loaded
    await redis.script_flush()
    assert (await scripts.complete(complete(run, "b", LARGE))).running
    assert await redis.get(RunKeys(run).output("b")) == LARGE
    assert await redis.scard(RunKeys(run).done) == 2


async def test_a_large_output_needs_the_synchronous_connection(redis):
    run = await start_run(redis, "no-bulk")
    with pytest.raises(ValueError, match=f"an output of {len(LARGE)} bytes is written apart"):
        await Scripts(redis).complete(complete(run, "a", LARGE))
    assert await run_keys(redis, run) == [RunKeys(run).meta.encode()]


async def test_outputs_are_read_from_their_hash_or_their_own_keys(redis, scripts, redis_server):
    """A reader finds each output where it lies, one alone or several at once."""
    run = await start_run(redis, "read")
    keys = RunKeys(run)
    for task_id, output in (("a", LARGE), ("b", b"small"), ("c", LARGE + b"c")):
        await scripts.complete(complete(run, task_id, output))
    bulk = scripts.bulk
    assert await bulk.hmget_many([(keys.outputs, ["a"])]) == [[LARGE]]
    assert await bulk.hmget_many([(keys.outputs, ["b"])]) == [[b"small"]]
    assert await bulk.hmget_many([(keys.outputs, ["gone"])]) == [[None]]
    assert await bulk.hmget_many([(keys.outputs, [])]) == [[]]
    many = await bulk.hmget_many([(keys.outputs, ["c", "gone", "b", "a"])])
    assert many == [[LARGE + b"c", None, b"small", LARGE]]


async def test_many_values_are_read_in_batches_in_the_order_asked(redis, redis_server):
    """Reads of several fields go by length in batches; what comes back is what one HMGET per
    hash would return, absent fields included."""
    big = b"b" * (READ_BATCH_BYTES + 1)
    await redis.hset("h1", mapping={"s1": b"1", "big": big, "s2": b"2"})
    await redis.hset("h2", mapping={"m1": b"m" * (READ_BATCH_BYTES // 2), "m2": b"n" * 10})
    requests = [("h1", ["s1", "gone", "big", "s2"]), ("h2", ["m1", "m2"]), ("h3", ["x"])]
    bulk = BulkReader(redis_server.url.rsplit("/", 1)[0] + f"/{DB}")
    try:
        batched = await bulk.hmget_many(requests)
        assert await bulk.hmget_many([("h1", ["s2"])]) == [[b"2"]]
    finally:
        bulk.close()
    assert batched == [await redis.hmget(key, fields) for key, fields in requests]


# ------------------------------------------------------------------------- serialization


def test_arrays_travel_out_of_band_and_come_back_writeable():
    value = {"a": np.arange(100_000, dtype=np.float64), "f": np.ones((300, 200), order="F")}
    blob = serialize(value)
    assert blob.startswith(OOB_MAGIC)
    back = deserialize(blob)
    assert np.array_equal(back["a"], value["a"]) and np.array_equal(back["f"], value["f"])
    assert back["f"].flags.f_contiguous
    for array in back.values():
        assert array.flags.writeable
        array += 1  # in place, as a task may change its input


def test_values_without_buffers_stay_plain_pickles():
    for value in ([1, "two", 3.0], b"bytes", np.float64(2.5)):
        blob = serialize(value)
        assert not blob.startswith(OOB_MAGIC)
        assert pickle.loads(blob) == value and deserialize(blob) == value


def test_a_truncated_out_of_band_value_is_refused_clearly():
    blob = serialize(np.zeros(1000))
    with pytest.raises(pickle.UnpicklingError, match="shorter than its 1 buffer lengths"):
        deserialize(blob[:100])


# ------------------------------------------------------------------------- whole runs


@dagkube.task
def block(index: int, elements: int) -> np.ndarray:
    return np.full(elements, float(index))


@dagkube.task
def add_in_place(arrays: list[np.ndarray]) -> np.ndarray:
    total = arrays[0]
    for array in arrays[1:]:
        total += array  # the first input, changed in place
    return total


def test_a_fan_in_of_large_arrays_runs_and_returns_a_writeable_array(runtime, redis_client):
    elements = 4 * OUTPUT_INLINE_MAX_BYTES // 8  # 256 KiB each: written apart
    wf = dagkube.Workflow(
        add_in_place([block(i, elements) for i in range(1, 5)]), name="it-data-plane"
    )
    result = wf.run(runtime=runtime)
    assert isinstance(result, np.ndarray) and result.flags.writeable
    assert result.shape == (elements,) and bool((result == 10.0).all())
    raw = redis_client.hvals(hist_run(wf.last_run.run_id, "tasks"))
    records = [TaskRecord.model_validate_json(r) for r in raw]
    stored = [r for r in records if r.output_stored]
    # The workflow's output and the inputs the consumer's worker did not produce itself
    # were uploaded, apart from the COMPLETE call, and timed.
    assert "add_in_place" in {r.function for r in stored} <= {"block", "add_in_place"}
    assert all(r.output_bytes > OUTPUT_INLINE_MAX_BYTES and r.upload_s > 0 for r in stored)
    # Each under its own key, dropped with the run's data once the driver had the result.
    keys = RunKeys(wf.last_run.run_id)
    assert not redis_client.keys(keys.output("*")) and not redis_client.exists(keys.outputs)


def test_arrays_of_megabytes_are_handed_on_in_parts_and_joined_for_redis(runtime):
    from dagkube.store.frames import Frames

    elements = 2 * 1024 * 1024 // 8  # 2 MiB each: serialized in parts (Frames)
    frames = serialize(np.full(elements, 1.0))
    assert isinstance(frames, Frames) and frames.startswith(OOB_MAGIC)
    assert float(deserialize(frames).sum()) == elements
    assert runtime.objects is None  # another Redis: no object store, so joined for a SET
    wf = dagkube.Workflow(
        add_in_place([block(i, elements) for i in range(1, 4)]), name="it-data-plane-mib"
    )
    result = wf.run(runtime=runtime)
    assert isinstance(result, np.ndarray) and bool((result == 6.0).all())


def test_a_bound_worker_runs_its_next_task_while_the_last_output_uploads(
    make_runtime, redis_client
):
    """The COMPLETE step (and upload) of a task on a bound worker overlaps the next ready
    task's execution: that task starts before the upload before it has ended. Before the
    overlap, the next task started only after the step's reply."""
    rt = make_runtime(max_workers=2)
    elements = 16 * 1024 * 1024 // 8  # 16 MiB each: an upload of milliseconds
    wf = None
    for _ in range(2):  # the second run plans from the first one's history
        wf = dagkube.Workflow(
            add_in_place([block(i, elements) for i in range(1, 9)]), name="it-data-plane-overlap"
        )
        result = wf.run("uniform", "avg", "1Gi", runtime=rt)
        assert bool((result == 36.0).all())
    assert wf is not None
    raw = redis_client.hvals(hist_run(wf.last_run.run_id, "tasks"))
    records = sorted((TaskRecord.model_validate_json(r) for r in raw), key=lambda r: r.started_at)
    pairs = []  # (a task whose output was uploaded, the next task of its worker)
    by_worker: dict[str, list[TaskRecord]] = {}
    for record in records:
        by_worker.setdefault(record.worker_id, []).append(record)
    for runs in by_worker.values():
        pairs += [(a, b) for a, b in pairwise(runs) if a.output_stored]
    assert pairs, f"no worker ran a task after one it uploaded: {[r.task_id for r in records]}"
    assert all(a.upload_s > 0 for a, _ in pairs)
    overlapped = [b for a, b in pairs if b.started_at < a.ended_at + a.upload_s]
    assert overlapped, [(a.task_id, a.ended_at, a.upload_s, b.started_at) for a, b in pairs]
