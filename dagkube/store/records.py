"""Metrics records: what every run leaves in its history (the planner's memory).

Timestamps are Unix seconds (float); durations carry ``_s``; sizes ``_bytes``; memory ``_mib``.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

# What one task error may store (its message and its traceback each), kept in the history
# for as long as the run: a 20 MB message left 80 MB in Redis before these caps.
ERROR_MESSAGE_MAX_BYTES = 8 * 1024
ERROR_TRACEBACK_MAX_BYTES = 32 * 1024


def cap_text(text: str, max_bytes: int) -> str:
    """``text`` if its UTF-8 form fits in ``max_bytes``, else its head and tail around a
    ``… [N bytes truncated] …`` marker, all within ``max_bytes`` (the start of a message says
    what failed, the end of a traceback where)."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= max_bytes:
        return text

    def marker(dropped: int) -> str:
        return f"\n… [{dropped} bytes truncated] …\n"

    # Room left for the text, with the marker as long as the largest count it can show.
    room = max_bytes - len(marker(len(data)).encode())
    if room < 2:
        raise ValueError(f"max_bytes={max_bytes} leaves no room beside the truncation marker")
    head = data[: room // 2].decode("utf-8", "ignore")  # a character cut in two is dropped
    tail = data[len(data) - (room - room // 2) :].decode("utf-8", "ignore")
    kept = len(head.encode("utf-8", "surrogatepass")) + len(tail.encode("utf-8", "surrogatepass"))
    return head + marker(len(data) - kept) + tail


class TaskError(BaseModel):
    """A task's exception, with the traceback from the worker that ran it; each capped
    (``ERROR_MESSAGE_MAX_BYTES``, ``ERROR_TRACEBACK_MAX_BYTES``) wherever it is built."""

    exc_type: str
    message: str
    traceback: str = ""

    @field_validator("message")
    @classmethod
    def _cap_message(cls, value: str) -> str:
        return cap_text(value, ERROR_MESSAGE_MAX_BYTES)

    @field_validator("traceback")
    @classmethod
    def _cap_traceback(cls, value: str) -> str:
        return cap_text(value, ERROR_TRACEBACK_MAX_BYTES)


class OomAttempt(BaseModel):
    """An earlier attempt of a task whose worker was killed for exceeding its class's memory
    (the task then ran again one class up)."""

    memory_mib: int
    peak_memory_bytes: int | None = None  # as the backend measured the killed worker


class TaskRecord(BaseModel):
    """One task as it actually ran (its last attempt)."""

    run_id: str
    task_id: str
    function: str
    worker_id: str  # the worker process (Pod) that ran it
    logical_worker: str | None = None  # the plan's worker id, None for flexible
    memory_mib: int
    ready_at: float  # the worker took the task
    inputs_ready_at: float
    started_at: float
    ended_at: float
    input_bytes: int = 0
    input_wait_s: float = 0.0  # ready -> inputs in hand
    download_s: float = 0.0
    download_bytes: int = 0
    upload_s: float = 0.0
    output_bytes: int = 0
    output_stored: bool = False
    cpu_s: float = 0.0  # CPU time of the thread that ran the function
    retries: int = 0  # attempts beyond the first
    recomputed: list[str] = Field(default_factory=list)  # lost upstream outputs re-run here
    error: TaskError | None = None
    # What optimizations did for this task (see docs/architecture.md, "Optimizations"):
    blocked_s: float = 0.0  # a bound worker waited for this task's inputs before taking it
    preloaded: list[str] = Field(default_factory=list)  # inputs fetched in the background
    preload_s: float = 0.0  # background fetch + deserialize time of those (input-wait saved)
    duplicate: bool = False  # this execution re-ran a late upstream (taskdup)
    duplicated: list[str] = Field(default_factory=list)  # upstreams re-run here before it
    delayed_io: Literal["kept", "uploaded"] | None = None  # delayed-io: upload skipped or not
    prewarm_at: float | None = None  # the pre-warm request this task triggered was due
    prewarm_targets: list[str] = Field(default_factory=list)
    # The worker process's peak resident memory while the task ran (interpreter and held
    # values included: what a memory limit on the worker counts); None where not measured.
    peak_memory_bytes: int | None = None
    oom_attempts: list[OomAttempt] = Field(default_factory=list)  # earlier attempts OOM-killed

    @property
    def duration_s(self) -> float:
        return self.ended_at - self.started_at


class WorkerRecord(BaseModel):
    """One worker's service to one run: from taking (or being spawned for) an invocation to
    finishing it. A warm worker's earlier idle time belongs to no run."""

    run_id: str
    worker_id: str
    logical_worker: str | None = None
    memory_mib: int
    cpu: float = 0.0
    outcome: Literal["finished", "lost"] = "finished"
    cold: bool
    queued_at: float | None = None  # the invocation was queued
    spawned_at: float | None = None  # the process/Pod was created (cold starts)
    ready_at: float | None = None  # the worker took the invocation
    first_task_at: float | None = None
    finished_at: float
    tasks_served: int = 0
    startup_s: float | None = None  # queued -> first task started
    cpu_s_used: float = 0.0
    resumed: bool = False  # this invocation was re-queued from a lost worker
    prewarmed: bool = False  # created ahead of demand by this run's pre-warm request
    registered_at: float | None = None  # the worker was up and waiting for work
    peak_memory_bytes: int | None = None  # its tasks' highest peak (lost: the backend's figure)
    oom_killed: bool = False  # lost: killed for exceeding its memory limit
    exit_code: int | None = None  # lost: the exit code its backend saw, if any
    lost_task: str = ""  # lost: the task it was running


class RunStatus(StrEnum):
    """A run's ``status`` in its meta hash and its record (the Lua scripts write these
    strings; a script's reply says ``missing`` for a run that does not exist)."""

    RUNNING = "running"
    CANCELLING = "cancelling"  # cancelled: its workers stop at their next task boundary
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# A run in one of these states has not ended yet.
LIVE_STATUSES = (RunStatus.RUNNING, RunStatus.CANCELLING)


def is_live(status: bytes | str | None) -> bool:
    """Whether a ``status`` read from a run's meta (bytes, as Redis returns it) has not ended."""
    if isinstance(status, bytes):
        status = status.decode()
    return status in LIVE_STATUSES


class RunRecord(BaseModel):
    """A run's totals, copied from its live state when it ends."""

    run_id: str
    workflow: str
    structure_hash: str
    planner: str
    sla: str
    status: RunStatus
    candidate: str = ""  # the planner of the candidate the plan chose (auto); "": unknown
    pool: str = ""
    submitted_at: float
    finished_at: float | None = None  # the run was finalized (every worker finished)
    completed_at: float | None = None  # the last task completed: the end of the makespan
    makespan_s: float | None = None
    tasks_total: int
    tasks_done: int = 0
    tasks_failed: int = 0
    workers_cold: int = 0
    workers_warm: int = 0
    workers_lost: int = 0
    gb_s: float = 0.0
    cpu_s_allocated: float = 0.0
    cpu_s_used: float = 0.0
    predicted_makespan_s: float | None = None
    model_makespan_s: float | None = None
    plan_history_runs: int = 0  # how many earlier runs the plan was made from
    startup_delay_s: float = 0.0
    optimizations: list[str] = Field(default_factory=list)  # switched on in the plan
    workers_prewarmed: int = 0  # invocations served by a worker pre-warmed for this run
    prewarm_requested: int = 0  # workers asked for by pre-warm requests
    prewarm_started: int = 0  # of those, created by the scaler (within the worker cap)
    prewarm_wasted: int = 0  # pre-warmed workers that exited unused (idle timeout)
    prewarm_wasted_gb_s: float = 0.0  # their lifetime, charged here (not in gb_s)
    workers_unused: int = 0  # created for a queued invocation another worker took first
    workers_unused_gb_s: float = 0.0  # their lifetime, charged here (not in gb_s)
    tasks_duplicated: int = 0  # duplicates started (taskdup)
    duplicates_won: int = 0  # duplicates that completed before the original
    tasks_stolen: int = 0  # ready tasks a bound worker took from a busier one (work stealing)
    enforced: bool = False  # workers ran under their class's memory and CPU limits
    oom_kills: int = 0  # workers killed for exceeding their class's memory
    escalations: int = 0  # of those, work re-queued one class up
    peak_memory_bytes: int | None = None  # the highest peak of its tasks (None: not measured)
    failed_task: str | None = None
    error: dict[str, Any] | None = None

    @property
    def planner_label(self) -> str:
        """The planner as run (the report and the metrics name it so): its name, plus the
        optimizations switched on by hand rather than by an ``-opt`` planner."""
        if not self.optimizations or self.planner.endswith("-opt"):
            return self.planner
        return f"{self.planner} + {','.join(self.optimizations)}"

    @classmethod
    def from_hash(cls, fields: dict[str, str]) -> RunRecord:
        data: dict[str, Any] = dict(fields)
        if data.get("error"):
            data["error"] = json.loads(data["error"])
        else:
            data.pop("error", None)
        data["optimizations"] = [o for o in str(data.get("optimizations") or "").split(",") if o]
        for key in (
            "predicted_makespan_s",
            "model_makespan_s",
            "failed_task",
            "finished_at",
            "completed_at",
            "makespan_s",
        ):
            if data.get(key) == "":
                data.pop(key)
        return cls.model_validate(data)
