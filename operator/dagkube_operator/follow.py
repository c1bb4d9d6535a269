"""Following a Running Workflow's run until it ends: its pool scaled, its progress mirrored
into ``.status``, worker Pods that cannot start reported, its deadline enforced, and its end
written (final status and Event; Pods still in its tasks deleted, idle ones left to the pool).

Nothing here is kept between calls but what ``.status`` and Redis hold: a restarted daemon
calls :func:`follow` again, its pool's scaler adopts the pool's Pods, and it enforces the same
deadline.
"""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

import kopf

from dagkube.errors import RunTimeout
from dagkube.kubernetes.backend import KubernetesBackend, StuckPod, stuck_pods
from dagkube.kubernetes.pods import LABEL_CLASS, LABEL_RUN
from dagkube.kubernetes.workflow_cr import Phase, WorkflowSpec
from dagkube.resources import parse_memory
from dagkube.runtime import launcher
from dagkube.store.keys import RunKeys, hist_run, local_part
from dagkube_operator import status as st
from dagkube_operator.core import Operator
from dagkube_operator.pools import remove_pods, stop_busy_workers
from dagkube_operator.reasons import Reason, WorkflowFailed, bounded_status, during, reason_of
from dagkube_operator.runs import Deadline, pool_for, run_deadline
from dagkube_operator.teardown import run_pool
from dagkube_operator.transient import StatusNotWritten

log = logging.getLogger("dagkube.operator")


async def follow(
    operator: Operator,
    body: kopf.Body,
    spec: WorkflowSpec,
    run_id: str,
    status: dict[str, Any],
    stopped: kopf.DaemonStopped,
    logger: logging.Logger,
) -> dict[str, Any]:
    """Scale the run's pool and mirror its progress until it ends or the daemon stops; the
    status then (the final one when the run ended)."""
    meta = body["metadata"]
    namespace = meta["namespace"]
    with during(f"making the Redis credentials of namespace {namespace}"):
        secret = await operator.worker_credentials(namespace)
    settings = operator.pool_settings(spec)
    pool = await run_pool(operator.redis, run_id) or pool_for(namespace, settings)
    with during(f"starting the scaler of pool {pool}"):
        backend = await operator.pools.acquire(
            namespace=namespace,
            pool=pool,
            settings=settings,
            run_id=run_id,
            max_workers=spec.max_workers or operator.config.max_workers,
            redis_url_secret=secret,
        )
    # The deadline counts from the start written in .status, the cancellation's grace from
    # the moment written in Redis: a restarted daemon enforces the same times.
    started = st.parse_timestamp(status.get("startTime")) or time.time()
    deadline = run_deadline(
        started,
        spec_timeout_s=spec.timeout_s,
        default_timeout_s=operator.config.default_timeout_s,
    )
    ended: str | None = None
    try:
        ended, failure_reason = await _wait_for_end(
            operator, body, backend, run_id, status, deadline, stopped, logger
        )
        if ended is not None:  # Pods still in its tasks go before the status is written,
            await stop_busy_workers(operator.redis, backend, run_id)
            # and so do those created for it that never started (they may never place).
            await remove_pods(backend, metrics=operator.metrics, phases={"Pending"}, run_id=run_id)
    finally:
        # An ended run's idle Pods stay in the pool for the next run; when the daemon stops
        # (shutdown, Workflow deleted) the pool's scaler stops with its last run.
        await operator.pools.release(pool, run_id, linger=ended is not None or not stopped)
    if ended is None:  # the daemon stops (operator shutdown, Workflow deleted)
        return status
    return await _write_end(operator, body, run_id, status, failure_reason)


async def _wait_for_end(
    operator: Operator,
    body: kopf.Body,
    backend: KubernetesBackend,
    run_id: str,
    status: dict[str, Any],
    deadline: Deadline | None,
    stopped: kopf.DaemonStopped,
    logger: logging.Logger,
) -> tuple[str | None, Reason | None]:
    """Wait for the run's end, ending it at its deadline or when a worker Pod stays Pending too
    long; how it ended (None: the daemon stopped first) and, for Pods that never started, the
    reason its Workflow fails with."""
    meta = body["metadata"]
    config = operator.config
    shown: dict[str, Any] = {}
    reported: set[tuple[str, str]] = set()  # (Pod, reason) already posted as an Event
    while not stopped:
        if deadline is not None and time.time() >= deadline.at:
            return await _time_out(operator, run_id, deadline.message, logger), None
        stuck = await _watch_pending(operator, body, backend, run_id, status, reported)
        if stuck is not None and stuck.reason == "Unschedulable":  # idle Pods may hold room
            pod = backend.last_pods.get(stuck.name) or {}
            memory = (pod.get("metadata") or {}).get("labels", {}).get(LABEL_CLASS)
            if memory:
                beside = (backend.pool, parse_memory(memory))
                await operator.pools.make_room(backend.namespace, beside=beside)
        if stuck is not None and time.time() - stuck.created_at > config.pending_timeout_s:
            message = (
                f"worker Pod {stuck.name} stayed Pending for more than "
                f"{config.pending_timeout_s:g}s: {stuck.reason}: {stuck.message}"
            )
            logger.warning("run %s: %s; ending it", run_id, message)
            ended = await launcher.cancel_and_end(
                operator.redis, run_id, message, grace_s=config.cancel_grace_s
            )
            return ended, reason_of(stuck.reason, Reason.WORKERS_PENDING)
        wait_s = config.progress_every_s
        if deadline is not None:
            wait_s = max(0.05, min(wait_s, deadline.at - time.time()))
        with contextlib.suppress(RunTimeout):  # not ended yet: show the progress, wait again
            return await launcher.wait_for_end(operator.redis, run_id, timeout_s=wait_s), None
        shown = await _mirror_progress(
            operator, meta["namespace"], meta["name"], run_id, shown, logger
        )
    return None, None


async def _mirror_progress(
    operator: Operator,
    namespace: str,
    name: str,
    run_id: str,
    shown: dict[str, Any],
    logger: logging.Logger,
) -> dict[str, Any]:
    """Write the run's progress into ``.status`` when it changed since ``shown``; the progress
    now shown. Best effort: a status that cannot be written is retried next time."""
    await _check_run_state(operator, run_id)
    await operator.worker_credentials(namespace)  # Redis may have restarted
    with during(f"reading the progress of run {run_id}"):
        record = await launcher.fetch_run_record(operator.redis, run_id)
    progress = st.progress_status(record)
    if progress == shown:
        return shown
    try:
        await operator.patch_status(namespace, name, progress)
    except StatusNotWritten as exc:  # progress is best effort: the run goes on
        logger.warning("%s (progress not shown; retried)", exc)
        return shown
    return progress


async def _write_end(
    operator: Operator,
    body: kopf.Body,
    run_id: str,
    status: dict[str, Any],
    failure_reason: Reason | None,
) -> dict[str, Any]:
    """The run ended: its final status written, an Event posted; the new status."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    await _check_run_state(operator, run_id)
    with during(f"reading the record of the ended run {run_id}"):
        record = await launcher.fetch_run_record(operator.redis, run_id)
    conditions = status.get("conditions")
    if any(c.get("type") == "WorkersPending" for c in conditions or []):
        conditions = st.pending_condition(conditions, [], time.time())
    final = st.final_status(record, conditions, time.time(), reason=failure_reason)
    full_text_in = await operator.keep_full_text(run_id, final["message"])
    final = bounded_status(final, full_text_in)
    with during("writing the final status"):
        await operator.patch_status(namespace, name, final)
    operator.metrics.set_phase(uid, final["phase"])
    operator.metrics.finished.labels(final["phase"]).inc()
    succeeded = final["phase"] == Phase.SUCCEEDED
    operator.event(
        body,
        Reason.SUCCEEDED if succeeded else Reason.FAILED,
        final["message"],
        warning=not succeeded,
        full_text_in=full_text_in,
    )
    return {**status, **final}


async def _check_run_state(operator: Operator, run_id: str) -> None:
    """A WorkflowFailed (RunStateLost) when Redis has neither the live run nor its
    history: it lost its data, or the keys were deleted; nothing is left to follow."""
    if not await operator.redis.exists(RunKeys(run_id).meta, hist_run(run_id, "meta")):
        raise WorkflowFailed(
            f"run {run_id}: its state is gone from Redis (neither {RunKeys(run_id).meta} "
            f"nor {hist_run(run_id, 'meta')} exists: Redis lost its data or the keys were "
            "deleted); it cannot be followed: apply the Workflow again to run it",
            reason=Reason.RUN_STATE_LOST,
        )


async def _watch_pending(
    operator: Operator,
    body: kopf.Body,
    backend: KubernetesBackend,
    run_id: str,
    status: dict[str, Any],
    reported: set[tuple[str, str]],
) -> StuckPod | None:
    """Report the run's worker Pods the scheduler cannot place or the kubelet cannot start
    (from the scaler's last list of the pool): the ``WorkersPending`` condition and one Warning
    Event per Pod and reason. Returns the oldest such Pod, None when there is none."""
    now = time.time()
    # The pool's Pods created for this run: another run's may be of a class this one never uses.
    ours = {
        name: pod
        for name, pod in backend.last_pods.items()
        if pod["metadata"]["labels"].get(LABEL_RUN) == local_part(run_id)
    }
    stuck = [
        s for s in stuck_pods(ours) if now - s.created_at >= operator.config.pending_report_after_s
    ]
    was_pending = any(
        c.get("type") == "WorkersPending" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if stuck or was_pending:
        conditions = st.pending_condition(
            status.get("conditions"), [(s.name, s.reason, s.message) for s in stuck], now
        )
        if conditions != status.get("conditions"):
            meta = body["metadata"]
            try:
                await operator.patch_status(
                    meta["namespace"], meta["name"], {"conditions": conditions}
                )
            except StatusNotWritten as exc:
                log.warning("%s (the pending condition is retried)", exc)
            else:
                status["conditions"] = conditions
    for pod in stuck:
        if (pod.name, pod.reason) not in reported:
            reported.add((pod.name, pod.reason))
            operator.event(
                body,
                reason_of(pod.reason, Reason.WORKERS_PENDING),
                f"worker Pod {pod.name}: {pod.reason}: {pod.message}",
                warning=True,
            )
    return stuck[0] if stuck else None


async def _time_out(operator: Operator, run_id: str, message: str, logger: logging.Logger) -> str:
    """The run's deadline passed: cancel, give the workers the grace to stop at a task
    boundary, then end the run without them. Whatever state the run was in (no worker
    yet, Pods pending, tasks running), it has ended when this returns."""
    logger.warning("run %s %s: cancelling", run_id, message)
    ended = await launcher.cancel_and_end(
        operator.redis, run_id, message, grace_s=operator.config.cancel_grace_s
    )
    return ended or "cancelled"
