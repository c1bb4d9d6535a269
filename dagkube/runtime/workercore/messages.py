"""The worker core's messages: events the I/O shell reports, instructions it carries out.

Every message is a frozen dataclass of plain data (task ids, flags, times in Unix seconds):
no Redis reply, no future, no record object crosses. ``Instruction.match(...)`` builds a
partial match for tests, as in dask/distributed's worker state machine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


class Message:
    """Base of events and instructions; ``match`` compares only the fields given."""

    @classmethod
    def match(cls, **fields: Any) -> _Match:
        return _Match(cls, fields)


@dataclass(frozen=True)
class _Match:
    cls: type
    fields: dict[str, Any]

    def __eq__(self, other: object) -> bool:
        return type(other) is self.cls and all(
            getattr(other, name) == value for name, value in self.fields.items()
        )

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.fields.items())
        return f"{self.cls.__name__}({shown}) (partial match)"


# ---------------------------------------------------------------------------- events
class Event(Message):
    """Something the shell saw: a Redis reply, a task's end, a wait that timed out."""


@dataclass(frozen=True)
class DoneRead(Event):
    """Which of the tasks asked for (``ReadDone``) a run has completed already."""

    done: frozenset[str]


@dataclass(frozen=True)
class TaskReady(Event):
    """A bound worker's inbox gave tasks whose inputs are all complete, in the order they
    became ready (one read takes every one there); the worker had waited since
    ``waited_from``."""

    task_ids: tuple[str, ...]
    waited_from: float


@dataclass(frozen=True)
class Stop(Event):
    """The inbox gave the stop token: the run failed or was cancelled."""


@dataclass(frozen=True)
class WorkerIdle(Event):
    """A bound worker's inbox stayed empty for the wait's timeout (begun at ``waited_from``)."""

    waited_from: float


@dataclass(frozen=True)
class UpstreamsRead(Event):
    """taskdup: of the upstreams asked for, the completed ones and the start times (Unix
    seconds) of the started ones, read at ``at``."""

    done: frozenset[str]
    started: dict[str, float]
    at: float


@dataclass(frozen=True)
class DuplicateClaimed(Event):
    """The claim on running ``upstream`` here was ``won`` (one duplicate per task)."""

    upstream: str
    won: bool


@dataclass(frozen=True)
class DuplicatedChecked(Event):
    """Before a task a consumer may duplicate: whether a duplicate completed it already."""

    task_id: str
    done: bool


@dataclass(frozen=True)
class Executed(Event):
    """The task ran (``ok``: no error left after its retries) and started at ``started_at``."""

    task_id: str
    ok: bool
    started_at: float
    output_bytes: int = 0  # of the output it uploads (0: none)


@dataclass(frozen=True)
class UploadDelayed(Event):
    """delayed-io's wait ended: ``kept`` when the fan-in's other inputs were all done."""

    task_id: str
    kept: bool


@dataclass(frozen=True)
class Completed(Event):
    """COMPLETE's reply: the run's status, the continuation it chose for a flexible worker
    and the ready consumers routed to this worker (``dagkube.planning.rules.route``);
    ``taken``: tasks of this bound worker that an idle worker took since its last step (work
    stealing: they run there, unless this worker finds one not done when it gets to it)."""

    task_id: str
    status: str
    continuation: str | None
    local_ready: tuple[str, ...] = ()
    taken: tuple[str, ...] = ()


@dataclass(frozen=True)
class Failed(Event):
    """FAIL recorded the task's error and failed the run."""

    task_id: str


@dataclass(frozen=True)
class Stole(Event):
    """The tasks a bound worker with nothing left took from the others' ready ones (none:
    nothing to take)."""

    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class TakenChecked(Event):
    """Which of the tasks others took from this bound worker are done."""

    done: frozenset[str]


@dataclass(frozen=True)
class StatusRead(Event):
    """The run's status, read after an idle wait."""

    running: bool


# ---------------------------------------------------------------------------- instructions
class Instruction(Message):
    """Something the shell must do; most answer with one event."""


@dataclass(frozen=True)
class ReadDone(Instruction):
    """Read whether the run completed ``task_id`` (``None``: which tasks it completed).
    -> DoneRead"""

    task_id: str | None


@dataclass(frozen=True)
class StartPreload(Instruction):
    """preload: fetch in the background the inputs the producers list for ``host``."""

    host: str


@dataclass(frozen=True)
class PrewarmRequest:
    """``count`` workers of ``memory_mib`` wanted ``delay_s`` after a task's start, for the
    ``targets`` they are meant for."""

    memory_mib: int
    count: int
    delay_s: float
    targets: tuple[str, ...] = ()


@dataclass(frozen=True)
class RequestPrewarm(Instruction):
    """prewarm: ask the scaler for workers, each request due its delay after the start of
    ``trigger``. The shell sends them (one pipeline) when it starts the ``Execute`` of
    ``trigger`` that follows: the delays count from that start."""

    trigger: str
    requests: tuple[PrewarmRequest, ...]


@dataclass(frozen=True)
class Execute(Instruction):
    """Run the task. ``store``: serialize its output for upload; ``blocked_since``: the
    worker waited for it since then (bound). -> Executed"""

    task_id: str
    store: bool
    duplicate: bool = False
    blocked_since: float | None = None


@dataclass(frozen=True)
class Fail(Instruction):
    """Record the executed task's error and fail the run. -> Failed"""

    task_id: str


@dataclass(frozen=True)
class DelayUpload(Instruction):
    """delayed-io: wait up to ``wait_s`` for ``others`` (the fan-in's other inputs) to be
    done before deciding to upload the output. -> UploadDelayed"""

    task_id: str
    fan_in: str
    others: tuple[str, ...]
    wait_s: float


@dataclass(frozen=True)
class Complete(Instruction):
    """Complete the executed task in one step: store its output if it is to be stored,
    count its consumers' inputs and queue or route the ready ones; ``pending`` are a
    flexible worker's tasks still to run (they travel with the step); ``next_task``: the
    task a bound worker runs next, already ready: the step also names it as what the worker
    runs now (its claim), a round trip less before it. ``overlapped``: the shell starts the
    step and carries on with the instructions that follow (that next task's ``Execute``)
    while it is under way; its ``Completed`` comes before that of any later step that is
    not overlapped (overlapped steps under way together are sent in one call).
    -> Completed"""

    task_id: str
    pending: tuple[str, ...] = ()
    next_task: str | None = None
    overlapped: bool = False


@dataclass(frozen=True)
class StoreOutput(Instruction):
    """Upload the executed task's output after all (delayed-io kept it for a fan-in that
    this worker does not run)."""

    task_id: str


@dataclass(frozen=True)
class CheckDuplicated(Instruction):
    """Note the start of a task a consumer may duplicate, and whether a duplicate completed
    it already. -> DuplicatedChecked"""

    task_id: str


@dataclass(frozen=True)
class WaitInbox(Instruction):
    """Wait up to ``timeout_s``, and not past ``until`` (Unix seconds) when given, for a task
    in the bound worker's inbox (listed as waiting meanwhile). -> TaskReady, Stop or
    WorkerIdle"""

    timeout_s: float
    until: float | None = None


@dataclass(frozen=True)
class ReadUpstreams(Instruction):
    """taskdup: read whether ``upstreams`` are done and when they started. -> UpstreamsRead"""

    upstreams: tuple[str, ...]


@dataclass(frozen=True)
class ClaimDuplicate(Instruction):
    """taskdup: claim running a duplicate of the late ``upstream`` for ``consumer`` (one
    claim per task, counted in the run). -> DuplicateClaimed"""

    upstream: str
    consumer: str


@dataclass(frozen=True)
class Steal(Instruction):
    """Work stealing: take up to ``most`` of the ready tasks other bound workers of
    ``victims`` have not started, from the end of their order (the ones they would run
    last). -> Stole"""

    victims: tuple[str, ...]
    most: int


@dataclass(frozen=True)
class CheckTaken(Instruction):
    """Read which of ``task_ids`` (this bound worker's, taken by others) are done.
    -> TakenChecked"""

    task_ids: tuple[str, ...]


@dataclass(frozen=True)
class ReadStatus(Instruction):
    """Read whether the run is still running. -> StatusRead"""


@dataclass(frozen=True)
class Finish(Instruction):
    """The invocation is over: ``served`` tasks executed, the first started at
    ``first_task_at`` (None if none ran)."""

    served: int
    first_task_at: float | None = field(default=None)
