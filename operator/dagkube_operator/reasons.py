"""Why a Workflow failed, said within bounds: the fixed set of reasons the operator posts (as
Event and condition reasons) and the limit on the messages that go with them.

User text (a build Pod's log or outcome, a task's error) only ever reaches a message, cut to a
few KiB; a reason is always one of :class:`Reason`, whatever the text says. An error nobody
foresaw fails its Workflow as ``InternalError``, its message naming the step it happened in
(:func:`during`).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Iterator
from typing import Any

from dagkube.errors import DagkubeError

MESSAGE_LIMIT_BYTES = 4096  # .status messages: well below what the API server accepts
# kopf cuts Event messages longer than 1024 characters in their middle: stay below, so the
# note that says where the full text is survives.
EVENT_MESSAGE_LIMIT_BYTES = 1000


class Reason(enum.StrEnum):
    """Every reason the operator writes into a condition or posts as an Event."""

    # The life of a Workflow.
    STARTED = "Started"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # Its spec and its source.
    INVALID_SPEC = "InvalidSpec"
    INVALID_SLA = "InvalidSLA"
    CLASS_NOT_ALLOWED = "ClassNotAllowed"
    MAX_WORKERS_ABOVE_LIMIT = "MaxWorkersAboveLimit"
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"
    SOURCE_NOT_ALLOWED = "SourceNotAllowed"
    MODULE_NOT_ALLOWED = "ModuleNotAllowed"
    MODULE_NOT_FOUND = "ModuleNotFound"
    MODULE_IMPORT_FAILED = "ModuleImportFailed"
    FUNCTION_NOT_FOUND = "FunctionNotFound"
    INVALID_ARGUMENTS = "InvalidArguments"
    INVALID_WORKFLOW = "InvalidWorkflow"
    INVALID_INLINE_SOURCE = "InvalidInlineSource"
    BUILD_FAILED = "BuildFailed"
    BUILD_TIMEOUT = "BuildTimeout"
    DAG_NOT_FOUND = "DagNotFound"
    PLAN_REJECTED = "PlanRejected"
    # Its run.
    RUN_STATE_LOST = "RunStateLost"
    INTERNAL_ERROR = "InternalError"
    # Worker Pods the scheduler cannot place or the kubelet cannot start (their own reasons,
    # dagkube.kubernetes.backend.STUCK_WAITING; any other: WorkersPending).
    WORKERS_PENDING = "WorkersPending"
    UNSCHEDULABLE = "Unschedulable"
    ERR_IMAGE_PULL = "ErrImagePull"
    IMAGE_PULL_BACK_OFF = "ImagePullBackOff"
    INVALID_IMAGE_NAME = "InvalidImageName"
    CREATE_CONTAINER_CONFIG_ERROR = "CreateContainerConfigError"
    CREATE_CONTAINER_ERROR = "CreateContainerError"


# What a build may report as its outcome (anything else it says is a BuildFailed).
BUILD_REASONS = frozenset(
    {
        Reason.MODULE_NOT_FOUND,
        Reason.MODULE_IMPORT_FAILED,
        Reason.FUNCTION_NOT_FOUND,
        Reason.INVALID_ARGUMENTS,
        Reason.INVALID_WORKFLOW,
        Reason.INVALID_INLINE_SOURCE,
        Reason.BUILD_FAILED,
    }
)


def reason_of(text: Any, default: Reason) -> Reason:
    """``text`` as a Reason when it is one, else ``default``: text from outside the operator
    (a child's report, a Pod's status) never becomes a reason of its own."""
    try:
        return Reason(text)
    except ValueError:
        return default


class WorkflowFailed(DagkubeError):
    """The Workflow cannot go on: it ends ``Failed`` with ``reason``, a condition and an Event."""

    def __init__(self, message: str, reason: Reason = Reason.INVALID_SPEC) -> None:
        super().__init__(message)
        self.reason = Reason(reason)


@contextlib.contextmanager
def during(step: str) -> Iterator[None]:
    """Name the step an error happened in: an InternalError's message says it."""
    try:
        yield
    except Exception as exc:
        if not getattr(exc, "__notes__", None):
            exc.add_note(step)
        raise


def internal_error(exc: BaseException) -> WorkflowFailed:
    """An error nobody foresaw, as the failure of its Workflow (not a retry loop)."""
    step = (getattr(exc, "__notes__", None) or ["handling the Workflow"])[0]
    return WorkflowFailed(
        f"the operator failed while {step}: {type(exc).__name__}: {exc} (an error it does "
        "not handle; its log has the traceback)",
        reason=Reason.INTERNAL_ERROR,
    )


def bounded(
    text: str, *, limit_bytes: int = MESSAGE_LIMIT_BYTES, full_text_in: str | None = None
) -> str:
    """``text`` when it fits in ``limit_bytes`` (UTF-8), else its head and tail around a note
    that says it was cut, how long it was and where the whole of it is kept (``full_text_in``,
    e.g. "Redis key dk:run:x:message")."""
    raw = text.encode()
    if len(raw) <= limit_bytes:
        return text
    where = f"; full text in {full_text_in}" if full_text_in else ""
    note = f" … (truncated, {len(raw)} bytes{where}) … "
    room = max(0, limit_bytes - len(note.encode()))
    head = raw[: room - room // 4].decode(errors="ignore")
    tail = raw[len(raw) - room // 4 :].decode(errors="ignore") if room // 4 else ""
    return f"{head}{note}{tail}"


def bounded_status(status: dict[str, Any], full_text_in: str | None = None) -> dict[str, Any]:
    """``status`` with its message and its conditions' messages bounded (a copy)."""
    out = dict(status)
    if isinstance(out.get("message"), str):
        out["message"] = bounded(out["message"], full_text_in=full_text_in)
    if isinstance(out.get("conditions"), list):
        out["conditions"] = [
            {**c, "message": bounded(c["message"], full_text_in=full_text_in)}
            if isinstance(c.get("message"), str)
            else c
            for c in out["conditions"]
        ]
    return out
