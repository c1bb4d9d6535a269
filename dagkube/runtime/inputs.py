"""A worker's inputs: the run state it holds, fetching a task's inputs (re-running lost
upstreams from their lineage), and pre-loading a fan-in's inputs in the background."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import pickle
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import cloudpickle
from redis import exceptions as redis_exceptions

from dagkube.dag import TaskSpec, resolve
from dagkube.runtime.workercore.run import RunView
from dagkube.store.calls import StoreCall
from dagkube.store.connection import BulkReader
from dagkube.store.frames import Frames, Serialized
from dagkube.store.keys import RunKeys
from dagkube.store.scripts import Scripts

log = logging.getLogger("dagkube.worker")


# A value whose pickle has out-of-band buffers (NumPy arrays and the like) is framed as
# OOB_MAGIC, the buffer count (u32), each buffer's length (u64), the pickle, the buffers. Any
# other value is a plain pickle, which starts with pickle's PROTO opcode (0x80), never with
# the magic.
OOB_MAGIC = b"DKB5"
_COUNT = struct.Struct("<I")
# Values with at least this much in out-of-band buffers are handed on unjoined (Frames).
FRAMES_MIN_BYTES = 1024 * 1024
# Upstreams re-run from their lineage are stored at least this often (recompute).
RECOMPUTE_STORE_EVERY_S = 0.25


def serialize(value: Any) -> Serialized:
    """Pickle protocol 5 with the large buffers out of band: the pickler then never copies
    an array's data into its own growing output (measured on a 16 MiB array: 17 ms in band,
    2.4 ms out of band, the single copy of the join included). From FRAMES_MIN_BYTES of
    buffers on, the parts are returned unjoined (:class:`Frames`): that copy is made only if
    the value goes to Redis. Fast path with pickle; cloudpickle for lambdas, local classes
    and the like."""
    buffers: list[pickle.PickleBuffer] = []
    try:
        head = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    except Exception:  # not swallowed: what pickle refuses goes to cloudpickle, which raises too
        buffers.clear()
        head = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if not buffers:
        return head
    raws = [buffer.raw() for buffer in buffers]
    lengths = struct.pack(f"<{len(raws)}Q", *(raw.nbytes for raw in raws))
    parts: tuple[bytes | memoryview, ...] = (
        OOB_MAGIC,
        _COUNT.pack(len(raws)),
        lengths,
        head,
        *raws,
    )
    if sum(raw.nbytes for raw in raws) >= FRAMES_MIN_BYTES:
        return Frames(parts)  # joined only if it goes to Redis (frames.py)
    # A hash field holds one string, so the parts are joined (one copy).
    return b"".join(parts)


def deserialize(blob: bytes) -> Any:
    """A value from :func:`serialize`'s bytes (or any plain pickle). Each out-of-band buffer
    is copied into a bytearray of its own (or, in a bytearray or a copy-on-write mapping
    given, used where it lies), so arrays come back writeable, as in-band ones do: tasks may
    change a NumPy input in place."""
    if isinstance(blob, Frames):
        blob = bytes(blob)
    view = memoryview(blob)
    if view[: len(OOB_MAGIC)] != OOB_MAGIC:
        return pickle.loads(view)
    (count,) = _COUNT.unpack_from(blob, len(OOB_MAGIC))
    head_at = len(OOB_MAGIC) + _COUNT.size + 8 * count
    lengths = struct.unpack_from(f"<{count}Q", blob, len(OOB_MAGIC) + _COUNT.size)
    buffers_at = len(blob) - sum(lengths)
    if buffers_at < head_at:
        raise pickle.UnpicklingError(
            f"out-of-band value of {len(blob)} bytes is shorter than its {count} buffer "
            f"lengths ({sum(lengths)} bytes) say"
        )
    # A bytearray or a private mapping (the object store's) is writeable and the caller's
    # alone: its buffers are used in place, not copied.
    owned = isinstance(blob, bytearray | mmap.mmap)
    buffers: list[Any] = []
    for length in lengths:
        part = view[buffers_at : buffers_at + length]
        buffers.append(part if owned else bytearray(part))
        buffers_at += length
    return pickle.loads(view[head_at : len(blob) - sum(lengths)], buffers=buffers)


@dataclass
class RunState(RunView):
    """What a worker keeps of one run besides what its core sees: loaded code and the
    values it holds."""

    values: dict[str, Any] = field(default_factory=dict)
    sizes: dict[str, int] = field(default_factory=dict)  # serialized sizes of held values
    constants: dict[str, Any] = field(default_factory=dict)
    functions: dict[str, Any] = field(default_factory=dict)
    loading: dict[str, asyncio.Future] = field(default_factory=dict)  # pre-loads in flight
    preloaded: dict[str, float] = field(default_factory=dict)  # input -> background seconds

    def function(self, fn_key: str) -> Any:
        fn = self.functions.get(fn_key)
        if fn is None:
            fn = self.functions[fn_key] = pickle.loads(self.dag.functions[fn_key])
        return fn


@dataclass
class Inputs:
    """A task's inputs not held locally: raw bytes by task (``const:<key>`` for constants),
    the upstreams re-run here, and the foreground download."""

    raw: dict[str, bytes]
    recomputed: list[str]
    download_s: float
    download_bytes: int


async def gather(
    state: RunState,
    spec: TaskSpec,
    reader: BulkReader,
    scripts: Scripts,
    executor: ThreadPoolExecutor,
) -> Inputs:
    """Fetch the inputs not held locally; re-run upstreams whose outputs were lost."""
    keys = RunKeys(state.run_id)
    loading = {state.loading[d] for d in spec.deps if d in state.loading}
    if loading:  # pre-loads of these inputs are in flight: they finish sooner than a fetch
        await asyncio.gather(*loading)
    missing = [d for d in spec.deps if d not in state.values]
    wanted_consts = [k for k in spec.const_keys if k not in state.constants]
    raw: dict[str, bytes] = {}
    download_s = 0.0
    nbytes = 0
    if missing or wanted_consts:
        started = time.perf_counter()
        requests = []
        if missing:
            requests.append((keys.outputs, missing))
        if wanted_consts:
            requests.append((keys.constants, wanted_consts))
        replies = await reader.hmget_many(requests)
        download_s = time.perf_counter() - started
        if missing:
            for dep, blob in zip(missing, replies[0], strict=True):
                if blob is not None:
                    raw[dep] = blob
                    nbytes += len(blob)
        if wanted_consts:
            consts = replies[-1]
            for key, blob in zip(wanted_consts, consts, strict=True):
                if blob is None:
                    raise RuntimeError(f"run {state.run_id}: constant {key} is missing")
                raw["const:" + key] = blob
                nbytes += len(blob)
    lost = [d for d in missing if d not in raw]
    recomputed = await recompute(state, lost, reader, scripts, executor) if lost else []
    return Inputs(raw, recomputed, download_s, nbytes)


async def recompute(
    state: RunState,
    lost: list[str],
    reader: BulkReader,
    scripts: Scripts,
    executor: ThreadPoolExecutor,
) -> list[str]:
    """Re-run upstream tasks whose outputs are gone (their worker died before a consumer
    elsewhere needed them). Walks lineage breadth-first, then runs in topological order."""
    keys = RunKeys(state.run_id)
    needed: set[str] = set()
    frontier = list(lost)
    fetched: dict[str, bytes] = {}
    while frontier:
        needed.update(frontier)
        parents = sorted(
            {d for t in frontier for d in state.dag.tasks[t].deps}
            - needed
            - set(state.values)
            - set(fetched)
        )
        frontier = []
        if parents:
            (blobs,) = await reader.hmget_many([(keys.outputs, parents)])
            for parent, blob in zip(parents, blobs, strict=True):
                if blob is None:
                    frontier.append(parent)
                else:
                    fetched[parent] = blob
    order = sorted(needed, key=state.task_index.__getitem__)
    log.warning(
        "run %s: re-running %d task(s) whose outputs were lost: %s",
        state.run_id,
        len(order),
        ", ".join(order[:5]),
    )
    loop = asyncio.get_running_loop()

    def load_fetched() -> None:
        for dep, blob in fetched.items():
            state.values[dep] = deserialize(blob)

    def rerun(task_id: str) -> Serialized:
        spec = state.dag.tasks[task_id]
        args, kwargs = resolve(pickle.loads(spec.args_blob), state.values, state.constants)
        state.values[task_id] = state.function(spec.fn_key)(*args, **kwargs)
        output = serialize(state.values[task_id])
        state.sizes[task_id] = len(output)
        return output

    await loop.run_in_executor(executor, load_fetched)
    # Stored as they are made, at least every RECOMPUTE_STORE_EVERY_S: should this worker be
    # lost too, the next one re-runs only what came after (a long lineage re-run whole each
    # time could be lost again and again, and the REQUEUE script counts what is stored as the
    # run's progress, so these losses are not taken for a crash loop).
    pending: dict[str, Serialized] = {}
    stored_at = time.monotonic()
    for position, task_id in enumerate(order):
        pending[task_id] = await loop.run_in_executor(executor, rerun, task_id)
        last = position == len(order) - 1
        if last or time.monotonic() - stored_at >= RECOMPUTE_STORE_EVERY_S:
            await scripts.store(StoreCall(state.run_id, pending, state.ttl_s))
            pending, stored_at = {}, time.monotonic()
    return order


class Preloader:
    """preload: fetches a host's fan-in inputs as their producers store them (the COMPLETE
    script lists them for the host), downloading on the I/O thread and deserializing on the
    preload thread, so the task thread keeps running. A task that needs an input still in
    flight awaits it instead of fetching it again.

    Stopping cannot rely on one cancellation: redis-py (on Python 3.11) may swallow it while
    the loop (re)connects or sends its BLPOP, and the loop would then poll forever, holding
    the invocation open (a flexible plan, which starts a pre-loader per task and stops them
    soon after, hung this way). So :meth:`stop` cancels again until the loop ends, and the
    loop also ends at its next poll once stopped."""

    POLL_S = 1.0  # the BLPOP's timeout: a stopped loop whose cancellation was lost ends by then
    RECANCEL_S = 0.05  # how long stop waits for a cancellation to land before repeating it

    def __init__(
        self,
        redis: Any,
        reader: BulkReader,
        executor: ThreadPoolExecutor,
        state: RunState,
        host: str,
    ) -> None:
        self.redis = redis
        self.reader = reader
        self.executor = executor
        self.state = state
        self.key = RunKeys(state.run_id).preload(host)
        self._stopped = False
        self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        self._stopped = True
        while not self._task.done():
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.RECANCEL_S)
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _loop(self) -> None:
        while not self._stopped:
            first = await self.redis.blpop(self.key, timeout=self.POLL_S)
            if first is None:
                continue
            ids = [first[1].decode()]
            more = await self.redis.lpop(self.key, 100)
            ids += [m.decode() for m in more or ()]
            try:
                await self._load(ids)
            except (redis_exceptions.RedisError, pickle.UnpicklingError, OSError) as exc:
                # The task fetches the input itself, as without pre-loading.
                log.warning("run %s: pre-load of %s failed: %s", self.state.run_id, ids, exc)

    async def _load(self, ids: list[str]) -> None:
        state = self.state
        ids = [i for i in dict.fromkeys(ids) if i not in state.values and i not in state.loading]
        if not ids:
            return
        loop = asyncio.get_running_loop()
        future: asyncio.Future = loop.create_future()
        for input_id in ids:
            state.loading[input_id] = future
        started = time.perf_counter()
        try:
            (blobs,) = await self.reader.hmget_many([(RunKeys(state.run_id).outputs, ids)])

            def load_all() -> None:
                for input_id, blob in zip(ids, blobs, strict=True):
                    if blob is not None:
                        state.values[input_id] = deserialize(blob)
                        state.sizes[input_id] = len(blob)

            await loop.run_in_executor(self.executor, load_all)
            share = (time.perf_counter() - started) / len(ids)
            for input_id in ids:
                if input_id in state.values:
                    state.preloaded[input_id] = share
        finally:
            for input_id in ids:
                state.loading.pop(input_id, None)
            future.set_result(None)
