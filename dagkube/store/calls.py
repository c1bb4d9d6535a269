"""Typed calls and replies of the Lua scripts: the wire format between Python and Lua.

Each call is a frozen dataclass whose fields say what they mean; ``encode()`` gives the
script's ARGV in the order its ``lua/*.lua`` file reads it (the key space of the call's
namespace first, :meth:`KeySpace.script_args`), ``keys()`` its KEYS, and ``decode(raw)``
turns the script's reply into the call's reply object. A script is only ever called through
these (:class:`dagkube.store.scripts.Scripts`), so an index cannot go wrong silently: the
order lives here once, next to the Lua that reads it (``tests/integration/test_store_scripts.py``
runs each one against Redis).

Replies come as bytes or str (clients with ``decode_responses``); both are accepted.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from dagkube.store.frames import Serialized, joined
from dagkube.store.keys import (
    KeySpace,
    PoolKeys,
    own_key,
    worker_heartbeat,
    worker_proc,
    worker_task,
)

ReplyT = TypeVar("ReplyT")

# Outputs up to this size ride on the COMPLETE call as an argument and become fields of the
# run's output hash (one command, the cheapest for the many small outputs). A larger one is
# written by a SET of its own key (keys.own_key) pipelined just before the call (same round
# trip): a script argument is copied into Lua and out again, and a hash field copied into the
# hash (measured: 12-40 ms of Redis time for 16 MiB), inside Redis's single thread, holding up
# every other client, where a SET keeps the buffer Redis received (about 9 us of command
# time; an append-only file still has the value written to it, outside any command).
OUTPUT_INLINE_MAX_BYTES = 64 * 1024


def is_large(output: Serialized) -> bool:
    """The output is written under its own key, apart from the script that stores it."""
    return len(output) > OUTPUT_INLINE_MAX_BYTES


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _flag(value: bool) -> int:
    return 1 if value else 0


class Call(Generic[ReplyT]):
    """A call of one script (``script``: the name of its ``lua/<name>.lua``)."""

    __slots__ = ()
    script: ClassVar[str]

    def space(self) -> KeySpace:
        """The key space of the namespace the call's keys lie in."""
        raise NotImplementedError

    def arguments(self) -> list[Any]:
        """The script's own arguments, after the key space."""
        raise NotImplementedError

    def encode(self) -> list[Any]:
        return [*self.space().script_args(), *self.arguments()]

    def keys(self) -> list[str]:
        return []

    def decode(self, raw: Any) -> ReplyT:
        raise NotImplementedError


# ------------------------------------------------------------------------------ COMPLETE
@dataclass(frozen=True, slots=True)
class Downstream:
    """A consumer of the completed task: what COMPLETE needs to count its input and route it
    once ready."""

    task_id: str
    dependencies: int  # how many upstream tasks it has
    memory_mib: int  # its class, for an invocation queued for it
    worker: str | None = None  # the logical worker planned for it (None: flexible)
    clustered: bool = False  # runs on the producer's worker (clustering)
    preload_host: str | None = None  # a host pre-loading this input (preload)
    offer: bool = False  # once ready, other bound workers may take it (work stealing)

    def encode(self) -> list[Any]:
        return [
            self.task_id,
            self.dependencies,
            self.worker or "",
            self.memory_mib,
            self.preload_host or "",
            int(self.clustered),
            int(self.offer),
        ]


def netstrings(fields: Sequence[str | bytes | int | float]) -> bytes:
    """``fields`` as one argument, each its length in bytes, a colon and its bytes (split by
    prelude.lua's ``fields``): the client packs each argument of a call in Python, about 1.5
    us each, and a bound worker's COMPLETE of a few tasks had 30 or more."""
    parts: list[bytes] = []
    for field in fields:
        data = field if isinstance(field, bytes) else str(field).encode()
        parts += (b"%d:" % len(data), data)
    return b"".join(parts)


def encode_consumers(consumers: Sequence[Downstream]) -> str:
    """A completion's consumers as one argument, a JSON array of their seven values each:
    the client packs each argument of a call in Python, and a 1,000-task fan-out's source
    as 7,000 arguments took 7-10 ms to send (as one, about 1 ms to encode)."""
    values = [consumer.encode() for consumer in consumers]
    return json.dumps(values, separators=(",", ":"), ensure_ascii=False)


@dataclass(frozen=True, slots=True)
class CompleteReply:
    """The run's status; the continuation COMPLETE chose for a flexible worker (None: none);
    whether this was a duplicate completion (the task was done already); the ready consumers
    routed to this worker; the tasks of this (bound) worker that others took since its last
    COMPLETE (work stealing)."""

    status: str
    continuation: str | None
    duplicate: bool
    local_ready: tuple[str, ...]
    taken: tuple[str, ...] = ()

    @property
    def running(self) -> bool:
        return self.status == "running"


@dataclass(frozen=True, slots=True)
class Completion:
    """One task of a COMPLETE: its record, its output (None: not stored), its consumers."""

    task_id: str
    record_json: str
    record_field: str
    output: Serialized | None
    now: float
    downstream: Sequence[Downstream] = ()
    offered: bool = False  # run by its planned worker, which offered it to others: withdraw it

    @property
    def output_apart(self) -> bool:
        """The output is too large to ride on the call: the caller writes it just before
        (:meth:`dagkube.store.scripts.Scripts.complete`), and the call only says so."""
        return self.output is not None and is_large(self.output)

    def encode(self) -> list[Any]:
        if self.output is None:
            mode, inline = "none", b""
        elif self.output_apart:
            mode, inline = "apart", b""
        else:
            mode, inline = "inline", joined(self.output)
        return [
            self.task_id,
            mode,
            inline,
            self.record_json,
            self.record_field,
            self.now,
            int(self.offered),
            encode_consumers(self.downstream),
        ]


@dataclass(frozen=True, slots=True)
class CompleteCall(Call[CompleteReply]):
    """Tasks completed (:class:`Completion`, one or more, in the order the worker ran them:
    a bound worker sends the tasks that ended while its last COMPLETE was under way together,
    its group commit): each one's record, its output (None: not stored; a large one is
    written apart, :meth:`apart`, with a TTL of ``run_ttl_s`` until the script takes it up),
    its consumers' inputs counted and the ready ones routed. The reply's ``duplicate`` is the
    last task's. A record field is the task id, or ``<id>@dup`` for a duplicate's record.
    ``amended_records`` (record field, record JSON) replace records sent earlier;
    ``pending_roots`` are a flexible worker's tasks still to run, kept in its proc list with
    what this completion adds. ``next_claim``: the claim (JSON) of the task the worker runs
    next, written to its task key instead of clearing it, if the run goes on."""

    script: ClassVar[str] = "complete"

    run_id: str
    pool: str
    worker_id: str
    logical_worker: str | None  # the bound worker this runs on (None: flexible)
    memory_mib: int  # the worker's class
    run_ttl_s: int  # the run's TTL: a large output's key ends then should no script take it up
    completions: Sequence[Completion]
    amended_records: Sequence[tuple[str, str]] = ()
    pending_roots: Sequence[str] = ()
    next_claim: str = ""

    def apart(self) -> dict[str, Serialized]:
        """The outputs too large to ride on the call (task id -> output): the caller writes
        them just before (:meth:`dagkube.store.scripts.Scripts.complete`)."""
        return {c.task_id: c.output for c in self.completions if c.output_apart and c.output}

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        completions = self.completions
        return [
            self.run_id,
            PoolKeys(self.pool).prefix,
            worker_proc(self.worker_id, self.pool),
            worker_task(self.worker_id, self.pool),
            self.logical_worker or "",
            self.memory_mib,
            self.next_claim,
            self.run_ttl_s,
            netstrings(
                [
                    len(self.amended_records),
                    *(part for amended in self.amended_records for part in amended),
                    len(self.pending_roots),
                    *self.pending_roots,
                    len(completions),
                    *(part for completion in completions for part in completion.encode()),
                ]
            ),
        ]

    def decode(self, raw: Any) -> CompleteReply:
        status, continuation, duplicate, *rest = raw
        n_ready = int(rest[0]) if rest else 0
        return CompleteReply(
            status=_text(status),
            continuation=_text(continuation) or None,
            duplicate=int(duplicate) == 1,
            local_ready=tuple(_text(task_id) for task_id in rest[1 : 1 + n_ready]),
            taken=tuple(_text(task_id) for task_id in rest[1 + n_ready :]),
        )


# --------------------------------------------------------------------------------- STEAL
@dataclass(frozen=True, slots=True)
class StealReply:
    taken: tuple[str, ...]  # in the order the thief is to run them (none: nothing to take)


@dataclass(frozen=True, slots=True)
class StealCall(Call[StealReply]):
    """Work stealing: a bound worker (``thief``) with nothing ready takes up to ``most`` of
    the ready tasks the ``victims`` (bound workers of the run) offered and have not started,
    from the end of each one's order, half of what lies beyond the ``keep`` a victim may be
    running already (at least one), the longest lists first; nothing if the run no longer
    runs or the thief's own inbox holds tasks."""

    script: ClassVar[str] = "steal"

    run_id: str
    thief: str
    victims: Sequence[str]
    most: int
    keep: int

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, self.thief, self.most, self.keep, *self.victims]

    def decode(self, raw: Any) -> StealReply:
        return StealReply(taken=tuple(_text(task_id) for task_id in raw))


# --------------------------------------------------------------------------------- STORE
@dataclass(frozen=True, slots=True)
class StoreReply:
    status: str  # the run's; "missing": its keys are gone, and nothing was kept


@dataclass(frozen=True, slots=True)
class StoreCall(Call[StoreReply]):
    """Outputs stored outside a completion (one kept for a later fan-in, upstreams re-run
    from their lineage), task id -> serialized output: the small ones ride on the call, the
    large ones (:attr:`apart`) are written under their own keys just before it, as COMPLETE's
    are (:meth:`dagkube.store.scripts.Scripts.store`). Nothing is kept for a run whose keys
    are gone."""

    script: ClassVar[str] = "store"

    run_id: str
    outputs: Mapping[str, Serialized]
    run_ttl_s: int  # as CompleteCall's

    @property
    def apart(self) -> list[str]:
        return [task_id for task_id, output in self.outputs.items() if is_large(output)]

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        inline = [(t, output) for t, output in self.outputs.items() if not is_large(output)]
        return [self.run_id, len(inline), *(part for pair in inline for part in pair), *self.apart]

    def decode(self, raw: Any) -> StoreReply:
        return StoreReply(status=_text(raw))


# ---------------------------------------------------------------------------------- FAIL
@dataclass(frozen=True, slots=True)
class FailReply:
    """The run's status before the failure ("missing": no such run); "running" means this
    failure failed the run."""

    previous_status: str


@dataclass(frozen=True, slots=True)
class FailCall(Call[FailReply]):
    """A task failed after its retries: its record, and the run failed with ``error_json``
    (its bound workers told to stop)."""

    script: ClassVar[str] = "fail"

    run_id: str
    task_id: str
    record_json: str
    error_json: str

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, self.task_id, self.record_json, self.error_json]

    def decode(self, raw: Any) -> FailReply:
        return FailReply(previous_status=_text(raw))


# --------------------------------------------------------------------------------- FINISH
@dataclass(frozen=True, slots=True)
class FinishReply:
    """Whether this finish ended the run, and its status; the next invocation the worker took
    from its class queue (JSON, None: none) and the status of that invocation's run."""

    finalized: bool
    status: str
    next_invocation: str | None
    next_run_status: str | None


@dataclass(frozen=True, slots=True)
class FinishCall(Call[FinishReply]):
    """An invocation ended on its worker: the worker's record (``worker_field`` in the run's
    history), the time charged to the run, the run's end if this was its last invocation, and
    the next invocation taken from ``next_queue`` (None: take none)."""

    script: ClassVar[str] = "finish"

    run_id: str
    pool: str
    worker_id: str
    worker_field: str
    worker_record_json: str
    gb_s: float
    cpu_s_allocated: float
    cpu_s_used: float
    cold: bool
    prewarmed: bool
    now: float
    run_ttl_s: int
    history_cap: int
    next_queue: str | None
    amended_records: Sequence[tuple[str, str]] = ()

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [
            self.run_id,
            PoolKeys(self.pool).prefix,
            worker_proc(self.worker_id, self.pool),
            self.worker_field,
            self.worker_record_json,
            self.gb_s,
            self.cpu_s_allocated,
            self.cpu_s_used,
            _flag(self.cold),
            self.now,
            self.run_ttl_s,
            self.history_cap,
            self.next_queue or "",
            _flag(self.prewarmed),
            len(self.amended_records),
            *(part for amended in self.amended_records for part in amended),
        ]

    def decode(self, raw: Any) -> FinishReply:
        finalized, status, next_invocation, next_status = raw
        return FinishReply(
            finalized=int(finalized) == 1,
            status=_text(status),
            next_invocation=_text(next_invocation) or None,
            next_run_status=_text(next_status) or None,
        )


# -------------------------------------------------------------------------------- REQUEUE
@dataclass(frozen=True, slots=True)
class RequeueReply:
    requeued: int  # invocations put back at the head of their queues


@dataclass(frozen=True, slots=True)
class RequeueCall(Call[RequeueReply]):
    """A worker of ``pool`` is gone: its held invocations re-queued (one class up if it was
    killed for memory) or, past the limits, their runs failed; its loss recorded."""

    script: ClassVar[str] = "requeue"

    pool: str
    worker_id: str
    memory_mib: int
    spawned_at: float
    now: float
    oom_killed: bool
    peak_memory_bytes: int | None
    exit_code: int | None
    max_requeues: int

    def space(self) -> KeySpace:
        return KeySpace.of(self.pool)

    def arguments(self) -> list[Any]:
        return [
            PoolKeys(self.pool).prefix,
            worker_proc(self.worker_id, self.pool),
            worker_task(self.worker_id, self.pool),
            worker_heartbeat(self.worker_id, self.pool),
            self.worker_id,
            self.now,
            self.memory_mib,
            self.spawned_at,
            _flag(self.oom_killed),
            "" if self.peak_memory_bytes is None else self.peak_memory_bytes,
            "" if self.exit_code is None else self.exit_code,
            self.max_requeues,
        ]

    def decode(self, raw: Any) -> RequeueReply:
        return RequeueReply(requeued=int(raw))


# ---------------------------------------------------------------------- run-level scripts
@dataclass(frozen=True, slots=True)
class RenewReply:
    renewed: bool  # False: the run ended (its keys have their final TTL)


@dataclass(frozen=True, slots=True)
class RenewCall(Call[RenewReply]):
    """Extend a live run's lease: its keys and history expire one run TTL (at least
    ``shortest_lease_s``) from now."""

    script: ClassVar[str] = "renew"

    run_id: str
    shortest_lease_s: float

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, self.shortest_lease_s]

    def decode(self, raw: Any) -> RenewReply:
        return RenewReply(renewed=int(raw) == 1)


@dataclass(frozen=True, slots=True)
class CancelReply:
    cancelled: bool  # False: the run was not running


@dataclass(frozen=True, slots=True)
class CancelCall(Call[CancelReply]):
    """Ask a running run's workers to stop; ``reason_json`` becomes its error."""

    script: ClassVar[str] = "cancel"

    run_id: str
    reason_json: str
    now: float

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, self.reason_json, self.now]

    def decode(self, raw: Any) -> CancelReply:
        return CancelReply(cancelled=int(raw) == 1)


@dataclass(frozen=True, slots=True)
class ForceEndReply:
    status: str | None  # the status the run ended with; None: it had ended already


@dataclass(frozen=True, slots=True)
class ForceEndCall(Call[ForceEndReply]):
    """End a run without its workers, dropping its invocations still queued."""

    script: ClassVar[str] = "force_end"

    run_id: str
    now: float

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, self.now]

    def decode(self, raw: Any) -> ForceEndReply:
        return ForceEndReply(status=_text(raw) or None)


@dataclass(frozen=True, slots=True)
class AddToRunReply:
    added: bool  # False: neither the run nor its history exists


@dataclass(frozen=True, slots=True)
class AddToRunCall(Call[AddToRunReply]):
    """Add to a run's counters (``increments``: meta field -> amount), in its history once it
    ended."""

    script: ClassVar[str] = "add_to_run"

    run_id: str
    increments: dict[str, float]

    def space(self) -> KeySpace:
        return KeySpace.of(self.run_id)

    def arguments(self) -> list[Any]:
        return [self.run_id, *(part for item in self.increments.items() for part in item)]

    def decode(self, raw: Any) -> AddToRunReply:
        return AddToRunReply(added=int(raw) == 1)


# -------------------------------------------------------------------------------- history
@dataclass(frozen=True, slots=True)
class PrunedRun:
    """A run PRUNE_STRUCTURE removed (or, dry, would remove)."""

    run_id: str
    workflow: str
    status: str
    finished_at: float


@dataclass(frozen=True, slots=True)
class PruneStructureReply:
    """The runs removed (or, dry, that would be), the ids whose records were gone already,
    the runs kept of those looked at, and the runs the structure keeps."""

    removed: tuple[PrunedRun, ...]
    missing: tuple[str, ...]
    kept: int
    left: int


@dataclass(frozen=True, slots=True)
class PruneStructureCall(Call[PruneStructureReply]):
    """Drop a structure's runs (of ``workflow``, None: any) beyond the newest ``keep_runs``
    and those finished before ``finished_before`` (Unix seconds); None: no such limit."""

    script: ClassVar[str] = "prune_structure"

    namespace: str | None
    structure_hash: str
    keep_runs: int | None
    finished_before: float | None
    dry_run: bool
    workflow: str | None

    def space(self) -> KeySpace:
        return KeySpace(self.namespace)

    def arguments(self) -> list[Any]:
        return [
            self.structure_hash,
            "" if self.keep_runs is None else self.keep_runs,
            "" if self.finished_before is None else self.finished_before,
            _flag(self.dry_run),
            self.workflow or "",
        ]

    def decode(self, raw: Any) -> PruneStructureReply:
        reply = json.loads(raw)
        return PruneStructureReply(
            # Lua's cjson writes an empty list as {}
            removed=tuple(
                PrunedRun(r["run"], r["workflow"], r["status"], float(r["finished_at"]))
                for r in reply["removed"] or []
            ),
            missing=tuple(reply["missing"] or []),
            kept=int(reply["kept"]),
            left=int(reply["left"]),
        )


@dataclass(frozen=True, slots=True)
class PruneIndexesReply:
    missing: tuple[str, ...]  # runs named by the indexes whose records are gone


@dataclass(frozen=True, slots=True)
class PruneIndexesCall(Call[PruneIndexesReply]):
    """Remove (or, dry, list) the entries of a namespace's history ``indexes`` naming a run
    whose records are gone."""

    script: ClassVar[str] = "prune_indexes"

    namespace: str | None
    indexes: Sequence[str]
    dry_run: bool

    def space(self) -> KeySpace:
        return KeySpace(self.namespace)

    def arguments(self) -> list[Any]:
        return [_flag(self.dry_run)]

    def keys(self) -> list[str]:
        return list(self.indexes)

    def decode(self, raw: Any) -> PruneIndexesReply:
        return PruneIndexesReply(missing=tuple(_text(run_id) for run_id in raw))


# -------------------------------------------------------------------------------- LENGTHS
@dataclass(frozen=True, slots=True)
class LengthsReply:
    lengths: tuple[int, ...]  # in the order asked; 0 for an absent field
    apart: tuple[bool, ...]  # which of them lie under their own key (keys.own_key)


@dataclass(frozen=True, slots=True)
class LengthsCall(Call[LengthsReply]):
    """The lengths of the values of hash fields, (hash key, field) pairs, each in its hash or
    under its own key (:func:`keys.own_key`); :class:`connection.BulkReader` reads several
    values in batches by their lengths."""

    script: ClassVar[str] = "lengths"

    fields: Sequence[tuple[str, str]]

    def space(self) -> KeySpace:
        return KeySpace(None)  # the keys come whole, in KEYS

    def arguments(self) -> list[Any]:
        return [field for _, field in self.fields]

    def keys(self) -> list[str]:
        return [name for key, field in self.fields for name in (key, own_key(key, field))]

    def decode(self, raw: Any) -> LengthsReply:
        return LengthsReply(
            lengths=tuple(int(length) for length in raw[0::2]),
            apart=tuple(int(apart) == 1 for apart in raw[1::2]),
        )
