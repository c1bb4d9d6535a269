"""Pure builders of a Workflow's ``.status`` (plain dicts for a merge patch) from run records.

Conditions follow the Kubernetes convention: one entry per ``type`` with status True/False,
a CamelCase reason, a message and the time of the last change. Lists are replaced whole by a
merge patch, so every patch that touches conditions carries the complete list.
"""

from __future__ import annotations

import datetime
from typing import Any

from dagkube.kubernetes.workflow_cr import Phase
from dagkube.planning.model import Plan
from dagkube.store.records import RunRecord, RunStatus


def timestamp(epoch_s: float) -> str:
    """RFC 3339 UTC, second precision, as Kubernetes writes times."""
    moment = datetime.datetime.fromtimestamp(epoch_s, tz=datetime.UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(text: str | None) -> float | None:
    if not text:
        return None
    moment = datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    return moment.replace(tzinfo=datetime.UTC).timestamp()


def with_condition(
    conditions: list[dict[str, Any]] | None,
    kind: str,
    status: bool,
    reason: str,
    message: str,
    now: float,
) -> list[dict[str, Any]]:
    """``conditions`` with the entry of ``kind`` set; its transition time moves only when its
    status changes."""
    value = "True" if status else "False"
    found = [dict(c) for c in conditions or [] if c.get("type") != kind]
    previous = next((c for c in conditions or [] if c.get("type") == kind), None)
    changed_at = (
        previous.get("lastTransitionTime")
        if previous is not None and previous.get("status") == value
        else None
    ) or timestamp(now)
    found.append(
        {
            "type": kind,
            "status": value,
            "reason": reason,
            "message": message,
            "lastTransitionTime": changed_at,
        }
    )
    return sorted(found, key=lambda c: c["type"])


def planning_status(conditions: list[dict[str, Any]] | None, now: float) -> dict[str, Any]:
    return {
        "phase": Phase.PLANNING,
        "conditions": with_condition(
            conditions, "Planned", False, "Planning", "loading history and planning", now
        ),
    }


def launched_status(
    run_id: str,
    plan: Plan,
    tasks_total: int,
    conditions: list[dict[str, Any]] | None,
    started_at: float,
) -> dict[str, Any]:
    workers = len({t.worker_id for t in plan.tasks.values() if t.worker_id}) or None
    classes = sorted({t.memory_mib for t in plan.tasks.values()})
    message = (
        f"{plan.planner} plan, SLA {plan.sla}: predicted makespan "
        f"{plan.predicted_makespan_s:.1f}s"
        + (f", {workers} logical workers" if workers else ", flexible workers")
        + f", classes {', '.join(f'{m}Mi' for m in classes)}"
    )
    conditions = with_condition(conditions, "Planned", True, "Planned", message, started_at)
    conditions = with_condition(conditions, "Running", True, "Launched", "run started", started_at)
    status: dict[str, Any] = {
        "phase": Phase.RUNNING,
        "runId": run_id,
        "planner": plan.planner,
        "sla": plan.sla,
        "tasks": {"total": tasks_total, "done": 0, "failed": 0},
        "startTime": timestamp(started_at),
        "conditions": conditions,
        "message": message,
    }
    if plan.predicted_makespan_s:
        status["predictedMakespanSeconds"] = round(plan.predicted_makespan_s, 3)
    if plan.predicted_gb_s:
        status["predictedGbSeconds"] = round(plan.predicted_gb_s, 3)
    return status


def progress_status(record: RunRecord) -> dict[str, Any]:
    """What changes while a run goes: task counts and the workers that served it."""
    return {
        "tasks": {
            "total": record.tasks_total,
            "done": record.tasks_done,
            "failed": record.tasks_failed,
        },
        "workers": {
            "cold": record.workers_cold,
            "warm": record.workers_warm,
            "prewarmed": record.workers_prewarmed,
        },
    }


def pending_condition(
    conditions: list[dict[str, Any]] | None,
    stuck: list[tuple[str, str, str]],
    now: float,
) -> list[dict[str, Any]]:
    """``conditions`` with ``WorkersPending``: True while worker Pods (name, reason, message)
    cannot be placed or started, naming the first; False once none is stuck."""
    if not stuck:
        return with_condition(
            conditions, "WorkersPending", False, "WorkersStarting", "no worker Pod is stuck", now
        )
    name, reason, message = stuck[0]
    others = f" (and {len(stuck) - 1} more)" if len(stuck) > 1 else ""
    text = f"worker Pod {name}{others}: {reason}: {message}".rstrip(": ")
    return with_condition(conditions, "WorkersPending", True, reason, text, now)


def final_status(
    record: RunRecord,
    conditions: list[dict[str, Any]] | None,
    now: float,
    reason: str | None = None,
) -> dict[str, Any]:
    """The status of an ended run: phase, measured makespan, resource use, SLA, failure
    (``reason`` overrides the failure's reason, e.g. a worker Pod that never started)."""
    succeeded = record.status == RunStatus.SUCCEEDED
    status = progress_status(record)
    status["phase"] = Phase.SUCCEEDED if succeeded else Phase.FAILED
    status["completionTime"] = timestamp(record.finished_at or now)
    status["resources"] = {
        "gbSeconds": round(record.gb_s, 3),
        "cpuSecondsAllocated": round(record.cpu_s_allocated, 3),
        "cpuSecondsUsed": round(record.cpu_s_used, 3),
    }
    if record.makespan_s is not None:
        status["actualMakespanSeconds"] = round(record.makespan_s, 3)
    if succeeded and record.makespan_s is not None and record.predicted_makespan_s:
        status["slaMet"] = record.makespan_s <= record.predicted_makespan_s
    conditions = with_condition(conditions, "Running", False, "Ended", "run ended", now)
    if succeeded:
        message = (
            f"{record.tasks_done} tasks in {record.makespan_s or 0:.2f}s, {record.gb_s:.2f} GB-s"
        )
        status["message"] = message
        status["conditions"] = with_condition(
            conditions, "Succeeded", True, "RunSucceeded", message, now
        )
        return status
    error = record.error or {}
    if record.status == RunStatus.CANCELLED:
        failure = "Cancelled"
        message = str(error.get("message") or "the run was cancelled")
    elif error.get("task_id") or record.failed_task:
        failure = "TaskFailed"
        message = (
            f"task {error.get('task_id') or record.failed_task} "
            f"({error.get('function', '?')}) raised {error.get('exc_type', 'an error')}: "
            f"{error.get('message', '')}"
        )
        status["failedTask"] = str(error.get("task_id") or record.failed_task)
    else:
        failure = "RunFailed"
        message = str(error.get("message") or f"run {record.status}")
    status["message"] = message
    status["conditions"] = with_condition(
        conditions, "Succeeded", False, reason or failure, message, now
    )
    return status


def failed_status(
    reason: str, message: str, conditions: list[dict[str, Any]] | None, now: float
) -> dict[str, Any]:
    """A Workflow that cannot run (bad spec, source that does not build, plan rejected)."""
    conditions = with_condition(conditions, "Succeeded", False, reason, message, now)
    return {
        "phase": Phase.FAILED,
        "message": message,
        "completionTime": timestamp(now),
        "conditions": conditions,
    }
