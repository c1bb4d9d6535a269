"""Lua scripts: each state transition of a run is one atomic step in Redis.

A worker that dies between two scripts leaves a consistent state: its unfinished work is still
in its ``proc`` list (re-queued by the scaler), completed tasks are in the run's ``done`` set,
and dependency counting is guarded per (upstream, downstream) edge, so re-running a task
cannot over-count.

The Lua lives in ``lua/*.lua`` (package data): ``prelude.lua`` first, then the history and
the run's end for the scripts that may end a run, then the script's own file. No script spells
a key name: each gets the prefixes of its namespace's key space as its first arguments
(:meth:`dagkube.store.keys.KeySpace.script_args`) and appends ids and part names, so every key
a script touches for a run of namespace N lies under ``dk:ns:N:`` (standalone Redis; see
docs/architecture.md), and a worker whose Redis user may touch only those keys can run every
script it calls (a key outside them would fail the script half-way with NOPERM). Scripts are
called through typed calls (:mod:`dagkube.store.calls`) on a :class:`Scripts`.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib import resources
from typing import TYPE_CHECKING, Any, TypeVar

from dagkube.store.calls import (
    AddToRunCall,
    AddToRunReply,
    Call,
    CancelCall,
    CancelReply,
    CompleteCall,
    CompleteReply,
    FailCall,
    FailReply,
    FinishCall,
    FinishReply,
    ForceEndCall,
    ForceEndReply,
    PruneIndexesCall,
    PruneIndexesReply,
    PruneStructureCall,
    PruneStructureReply,
    RenewCall,
    RenewReply,
    RequeueCall,
    RequeueReply,
    StealCall,
    StealReply,
    StoreCall,
    StoreReply,
)
from dagkube.store.frames import Serialized
from dagkube.store.keys import RUN_PARTS, RunKeys
from dagkube.store.objects import delete_names, spill

if TYPE_CHECKING:
    from dagkube.store.connection import BulkReader

ReplyT = TypeVar("ReplyT")

# History limits (docs/architecture.md, "History"): runs kept per structure come with each run
# (``history_cap``); these two bound the number of structures and how long an unused one stays.
# A run's meta may carry its own (``history_structures``, ``history_retention_s``).
DEFAULT_HISTORY_STRUCTURES = 1000  # the most recently used structures kept
DEFAULT_HISTORY_RETENTION_S = 90 * 86400  # a structure not run for this long is dropped
# Redis expires history keys this long after the retention if no run ends meanwhile (a run
# that ends drops expired structures itself, index entries included).
HISTORY_EXPIRY_GRACE_S = 86400
HISTORY_EVICT_BATCH = 8  # structures one finalize drops at most (the rest: the next ones)

LUA_FOLDER = resources.files("dagkube.store") / "lua"


def _lua(name: str) -> str:
    return (LUA_FOLDER / f"{name}.lua").read_text(encoding="utf-8")


# keys.RUN_PARTS, for prelude.lua's expire_run.
_RUN_PARTS = "local RUN_PARTS = {" + ", ".join(f"'{part}'" for part in RUN_PARTS) + "}\n"
_HISTORY_LIMITS = f"""
local DEFAULT_RETENTION_S = {DEFAULT_HISTORY_RETENTION_S}
local DEFAULT_STRUCTURES = {DEFAULT_HISTORY_STRUCTURES}
local EXPIRY_GRACE_S, EVICT_BATCH = {HISTORY_EXPIRY_GRACE_S}, {HISTORY_EVICT_BATCH}
"""

# The files each script is made of, in order, after the prelude.
_PARTS = {
    "complete": ("complete",),
    "store": ("store",),
    "fail": ("fail",),
    "renew": ("renew",),
    "cancel": ("cancel",),
    "add_to_run": ("add_to_run",),
    "finish": ("history", "finalize", "finish"),
    "requeue": ("history", "finalize", "requeue"),
    "force_end": ("history", "finalize", "force_end"),
    "prune_structure": ("history", "prune_structure"),
    "prune_indexes": ("history", "prune_indexes"),
    "lengths": ("lengths",),
    "steal": ("steal",),
}


def _source(name: str) -> str:
    parts = [_RUN_PARTS, _lua("prelude")]
    for part in _PARTS[name]:
        if part == "history":
            parts.append(_HISTORY_LIMITS)
        parts.append(_lua(part))
    return "\n".join(parts)


# Every script's whole text, by name (the ACL users read the commands they send from these).
SOURCES = {name: _source(name) for name in _PARTS}
# The scripts a worker calls (COMPLETE, FAIL, FINISH; STORE for outputs stored outside a
# completion; ADD_TO_RUN when it was created for a run it never served; LENGTHS before reading
# several inputs; STEAL when a bound worker has nothing left); the rest are called by the
# operator and the local driver (launcher, scaler, history pruning).
WORKER_SCRIPTS = ("complete", "store", "fail", "finish", "add_to_run", "lengths", "steal")


class Scripts:
    """The scripts, registered on one client as they are first called (redis-py's ``Script``:
    EVALSHA, loaded again when a restarted Redis lost its script cache). ``bulk``: the
    synchronous connection that sends large outputs with their COMPLETE or STORE (workers)."""

    def __init__(self, redis: Any, bulk: BulkReader | None = None) -> None:
        self.redis = redis
        self.bulk = bulk
        self._registered: dict[str, Any] = {}

    async def call(self, call: Call[ReplyT]) -> ReplyT:
        script = self._registered.get(call.script)
        if script is None:
            script = self._registered[call.script] = self.redis.register_script(
                SOURCES[call.script]
            )
        return call.decode(await script(keys=call.keys(), args=call.encode()))

    async def complete(self, call: CompleteCall) -> CompleteReply:
        """COMPLETE. A large output (:meth:`CompleteCall.apart`) is written apart, just
        before the script (:meth:`_after_apart`)."""
        return await self._after_apart(call, call.run_id, call.apart(), call.run_ttl_s)

    async def store(self, call: StoreCall) -> StoreReply:
        """STORE, its large outputs written apart just before the script (:meth:`_after_apart`)."""
        apart = {task_id: call.outputs[task_id] for task_id in call.apart}
        return await self._after_apart(call, call.run_id, apart, call.run_ttl_s)

    async def _after_apart(
        self, call: Call[ReplyT], run_id: str, apart: Mapping[str, Serialized], ttl_s: int
    ) -> ReplyT:
        """``call``, after a ``SET NX`` of each output of ``apart`` (task id -> output) under
        its own key (:meth:`RunKeys.output`, with a TTL of ``ttl_s`` should no script take it
        up) sent on ``bulk`` in the same round trip: the first write of a task's output wins
        (tasks are deterministic: a duplicate's output is the same), and the script makes the
        key one of the run's, or removes it if the run is gone (lua/prelude.lua). With an
        object store (``bulk.objects``) an output of at least its threshold is put there first
        and the key holds a reference; the object is deleted again if the run is gone."""
        if not apart:
            return await self.call(call)
        if self.bulk is None:
            task_id, output = next(iter(apart.items()))
            raise ValueError(
                f"task {task_id}: an output of {len(output)} bytes is written apart from its "
                "script, which needs Scripts(redis, bulk=BulkReader(...))"
            )
        keys = RunKeys(run_id)
        objects, names = self.bulk.objects, list[str]()
        if objects is not None:  # the largest go to the object store, a reference to Redis
            apart, names = await self.bulk.in_io(spill, objects, run_id, apart)
        raw = await self.bulk.set_then_script(
            [(keys.output(task_id), output) for task_id, output in apart.items()],
            ttl_s,
            SOURCES[call.script],
            call.keys(),
            call.encode(),
        )
        reply = call.decode(raw)
        if names and getattr(reply, "status", "") == "missing":  # nothing will ever read them
            await self.bulk.in_io(delete_names, objects, names)
        return reply

    async def steal(self, call: StealCall) -> StealReply:
        return await self.call(call)

    async def fail(self, call: FailCall) -> FailReply:
        return await self.call(call)

    async def finish(self, call: FinishCall) -> FinishReply:
        return await self.call(call)

    async def requeue(self, call: RequeueCall) -> RequeueReply:
        return await self.call(call)

    async def renew(self, call: RenewCall) -> RenewReply:
        return await self.call(call)

    async def cancel(self, call: CancelCall) -> CancelReply:
        return await self.call(call)

    async def force_end(self, call: ForceEndCall) -> ForceEndReply:
        return await self.call(call)

    async def add_to_run(self, call: AddToRunCall) -> AddToRunReply:
        return await self.call(call)

    async def prune_structure(self, call: PruneStructureCall) -> PruneStructureReply:
        return await self.call(call)

    async def prune_indexes(self, call: PruneIndexesCall) -> PruneIndexesReply:
        return await self.call(call)


def call_sync(redis: Any, call: Call[ReplyT]) -> ReplyT:
    """One call on a synchronous client (tools and tests)."""
    script = redis.register_script(SOURCES[call.script])
    return call.decode(script(keys=call.keys(), args=call.encode()))
