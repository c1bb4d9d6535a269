"""The scaler's counts of supply against demand, read from a real Redis while a worker changes
state between two of its reads: a worker that registers and takes (or waits for) work then must
not be missed, or the scaler starts a worker too many.

The backend is an in-memory stand-in (the worker it knows of never runs): what is under test is
what the scaler reads from Redis and what it asks the backend for; the real backends are tested
with real processes and Pods elsewhere."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from dagkube.runtime.invocation import Invocation
from dagkube.runtime.scaler import Scaler, WorkerExit, WorkerHandle, prewarm_entry
from dagkube.store.keys import PoolKeys, RunKeys, worker_heartbeat, worker_proc
from dagkube.store.records import RunStatus

MEMORY = 512


class Starting:
    """A backend whose one worker was created and has not registered yet."""

    def __init__(self) -> None:
        self.max_workers = 4
        self.workers = {"w-starting": WorkerHandle("w-starting", MEMORY, time.time())}
        self.started: list[tuple[int, str | None, str | None]] = []

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        self.started.append((memory_mib, prewarm_for, demand_for))
        handle = WorkerHandle(f"w-new-{len(self.started)}", memory_mib, time.time())
        self.workers[handle.worker_id] = handle
        return handle

    def alive(self) -> list[WorkerHandle]:
        return list(self.workers.values())

    async def reap(self) -> list[WorkerExit]:
        return []

    async def discard(self, worker_id: str) -> None:
        self.workers.pop(worker_id, None)

    async def stop_all(self) -> None:
        self.workers.clear()


@pytest.fixture
async def redis(redis_server) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _registers(redis: aioredis.Redis, keys: PoolKeys, worker_id: str) -> None:
    """What a starting worker does first: a heartbeat, then its registration."""
    await redis.set(worker_heartbeat(worker_id, keys.pool), "1", ex=30)
    await redis.hset(keys.workers, worker_id, MEMORY)


def _after_idle_read(scaler: Scaler, step) -> None:
    """Run ``step`` (the worker's move) right after the scaler's first read of the idle sets."""
    read = scaler.idle_ids
    fired = False

    async def idle_ids() -> dict[int, set[str]]:
        nonlocal fired
        found = await read()
        if not fired:
            fired = True
            await step()
        return found

    scaler.idle_ids = idle_ids  # type: ignore[method-assign]


async def test_a_worker_that_registers_and_takes_work_mid_count_is_not_replaced(redis):
    keys = PoolKeys(f"pool-{uuid.uuid4().hex[:8]}")
    backend = Starting()
    scaler = Scaler(redis, keys.pool, backend)
    await redis.sadd(keys.classes, MEMORY)
    await redis.lpush(keys.queue(MEMORY), Invocation(run="r1", mem=MEMORY).to_json())

    async def registers_and_takes() -> None:
        await _registers(redis, keys, "w-starting")
        await redis.lmove(keys.queue(MEMORY), worker_proc("w-starting", keys.pool), "LEFT", "RIGHT")

    # The queue and idle counts of _scale are read in one pipeline; the worker moves between
    # them and the read of the registrations, whichever comes first.
    original = redis.hkeys
    fired = False

    async def hkeys(name):
        nonlocal fired
        if not fired and name == keys.workers:
            fired = True
            await registers_and_takes()
        return await original(name)

    redis.hkeys = hkeys  # type: ignore[method-assign]
    try:
        await scaler.reconcile()
    finally:
        redis.hkeys = original  # type: ignore[method-assign]
    assert fired
    assert await redis.llen(keys.queue(MEMORY)) == 0
    assert backend.started == [], "the invocation the starting worker took was served twice"
    # The same counts without the worker's move still start what is missing.
    await redis.lpush(keys.queue(MEMORY), Invocation(run="r1", mem=MEMORY).to_json())
    await scaler.reconcile()
    assert backend.started == [(MEMORY, None, "r1")]


async def test_a_worker_that_registers_idle_mid_count_covers_a_prewarm_request(redis):
    keys = PoolKeys(f"pool-{uuid.uuid4().hex[:8]}")
    backend = Starting()
    scaler = Scaler(redis, keys.pool, backend)
    run = f"r-{uuid.uuid4().hex[:8]}"
    await redis.hset(RunKeys(run).meta, "status", RunStatus.RUNNING.value)
    await redis.sadd(keys.classes, MEMORY)
    await redis.zadd(keys.prewarm, {prewarm_entry(run, MEMORY, 1, "t#0"): time.time() - 1})

    async def registers_idle() -> None:
        await _registers(redis, keys, "w-starting")
        await redis.sadd(keys.idle(MEMORY), "w-starting")

    _after_idle_read(scaler, registers_idle)
    await scaler.reconcile()
    assert await redis.sismember(keys.idle(MEMORY), "w-starting")
    assert backend.started == [], "an idle worker was there for the pre-warm request"
    meta = await redis.hgetall(RunKeys(run).meta)
    assert meta[b"prewarm_requested"] == b"1"
    assert meta[b"prewarm_started"] == b"0"
