"""A worker's heartbeat outlives a Redis outage: a beat that fails is logged and the next one
tried (before, the heartbeat task ended at its first error while the worker went on working,
so the scaler took the worker for lost and re-ran its work elsewhere)."""

from __future__ import annotations

import asyncio

from dagkube.runtime.worker import Worker, WorkerConfig
from dagkube.store.connection import connect
from dagkube.store.keys import worker_heartbeat
from tests.conftest import RedisServer


def test_heartbeats_resume_after_redis_comes_back(tmp_path, caplog):
    server = RedisServer(tmp_path)
    config = WorkerConfig(
        redis_url=server.url, pool="beat", memory_mib=512, worker_id="w-beat",
        heartbeat_s=0.05, heartbeat_ttl_s=0.5,
    )  # fmt: skip
    worker = Worker(config)
    key = worker_heartbeat("w-beat")

    async def scenario() -> int:
        worker.redis = await connect(server.url)
        worker.beats = await connect(server.url)
        beating = asyncio.create_task(worker._heartbeat())
        try:
            await asyncio.sleep(0.3)
            server.stop()  # every beat now fails
            await asyncio.sleep(0.5)
            assert not beating.done(), "the heartbeat task ended at the first failed beat"
            server.start()
            await asyncio.sleep(1.5)
            assert not beating.done()
            return int(server.client().pttl(key))
        finally:
            beating.cancel()
            await worker.beats.aclose()
            await worker.redis.aclose()

    try:
        ttl_ms = asyncio.run(scenario())
    finally:
        server.stop()
    assert 0 < ttl_ms <= 500, f"no heartbeat after Redis came back (PTTL {ttl_ms})"
    assert "w-beat: heartbeat failed" in caplog.text
