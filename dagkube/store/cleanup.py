"""Removing a pool's and a run's keys: one list of what they own, for the local runtime and
the operator alike (a key left out here would outlive its pool or run, with no TTL to end it).

A run's keys also get a TTL when it ends (the FINALIZE step of the Lua scripts); these
deletions are for a pool that goes away with its runtime or Workflow, and for a Workflow
deleted with its run's keys.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from dagkube.store.keys import PoolKeys, RunKeys, worker_proc
from dagkube.store.objects import ObjectStore


async def delete_pool_keys(redis: Any, pool: str, worker_ids: Iterable[str] = ()) -> None:
    """Every key of ``pool``: its queue and idle set per class, its class set, worker
    registry, wake list, waiting set and pre-warm requests, and the ``proc`` list of each
    registered worker and of the ``worker_ids`` given (workers started but not registered)."""
    keys = PoolKeys(pool)
    classes = [int(c) for c in await redis.smembers(keys.classes)]
    registered = [w.decode() for w in await redis.hkeys(keys.workers)]
    names = [keys.classes, keys.workers, keys.wake, keys.waiting, keys.prewarm]
    names += [keys.queue(m) for m in classes] + [keys.idle(m) for m in classes]
    names += [worker_proc(w, pool) for w in sorted({*registered, *worker_ids})]
    await redis.delete(*names)


async def delete_run_keys(redis: Any, run_id: str, *also: str) -> None:
    """Every key of the run (the dynamic ones its key set lists too), and ``also``; its
    history stays (history has limits of its own)."""
    keys = RunKeys(run_id)
    dynamic = [k.decode() for k in await redis.smembers(keys.keyset)]
    await redis.unlink(*keys.fixed, *also, *dynamic)


async def drop_run_data(redis: Any, run_id: str, objects: ObjectStore | None = None) -> None:
    """A finished run's data once its driver has the outputs: its output hash, the large
    outputs' own keys (listed in its key set), constants and DAG, and its objects in
    ``objects``; its history stays. UNLINK frees the memory off Redis's main thread."""
    keys = RunKeys(run_id)
    large = keys.output("").encode()  # how every large output's key begins
    apart = [k.decode() for k in await redis.smembers(keys.keyset) if k.startswith(large)]
    await redis.unlink(keys.outputs, keys.constants, keys.dag, *apart)
    if objects is not None:
        await asyncio.to_thread(objects.delete_run, run_id)
