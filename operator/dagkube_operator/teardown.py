"""The end of a Workflow's life: failing it, deleting it when its ``ttlSecondsAfterFinished``
has passed, and cleaning up when it goes (its run cancelled, the Pods still in its tasks and
its keys removed; its pool's idle Pods stay for other runs, and the history stays: it is what
the planner learns from).

Every step here is safe to repeat: it runs again after an error that passes, and after an
operator restart.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import kopf

from dagkube.kubernetes.backend import KubernetesBackendError
from dagkube.kubernetes.workflow_cr import Phase
from dagkube.runtime import launcher
from dagkube.store.cleanup import delete_run_keys
from dagkube.store.keys import RunKeys, hist_run
from dagkube.store.records import is_live
from dagkube_operator import status as st
from dagkube_operator.core import Operator
from dagkube_operator.pools import remove_pods, stop_busy_workers
from dagkube_operator.reasons import WorkflowFailed, bounded
from dagkube_operator.runs import message_key, pool_for, run_id_for
from dagkube_operator.spec import SpecError, parse_spec
from dagkube_operator.transient import backoff_delay_s, is_transient

TTL_DELETE_ATTEMPTS = 10  # a finished Workflow's deletion, retried with backoff this often

log = logging.getLogger("dagkube.operator")


async def fail(
    operator: Operator,
    body: kopf.Body,
    error: WorkflowFailed,
    stopped: kopf.DaemonStopped,
    logger: logging.Logger,
) -> None:
    """End the Workflow Failed with ``error``'s reason: its run (when launched) cancelled
    and ended, its Pods released, the status, a condition and a Warning Event written.
    Safe to repeat (a retry after an error that passes)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    status = dict(body.get("status") or {})
    run_id = status.get("runId") or run_id_for(namespace, name, uid)
    redis = operator.redis
    full_text_in = None
    if await redis.exists(RunKeys(run_id).meta, hist_run(run_id, "meta")):
        full_text_in = await operator.keep_full_text(run_id, str(error))
    message = bounded(str(error), full_text_in=full_text_in)
    if is_live(await redis.hget(RunKeys(run_id).meta, "status")):
        await launcher.cancel_and_end(
            redis, run_id, message, grace_s=operator.config.cancel_grace_s
        )
    await release_run(operator, body, run_id, keep_failed=True)
    failed = st.failed_status(error.reason, message, status.get("conditions"), time.time())
    await operator.patch_status(namespace, name, failed)
    operator.metrics.set_phase(uid, Phase.FAILED)
    operator.metrics.finished.labels(Phase.FAILED).inc()
    operator.metrics.errors.labels(error.reason.value).inc()
    operator.event(body, error.reason, message, warning=True, full_text_in=full_text_in)
    logger.warning("failed (%s): %s", error.reason.value, message)
    await expire(operator, body, {**status, **failed}, stopped, logger)


async def expire(
    operator: Operator,
    body: kopf.Body,
    status: dict[str, Any],
    stopped: kopf.DaemonStopped,
    logger: logging.Logger,
) -> None:
    """``ttlSecondsAfterFinished``: delete the Workflow (and so its Pods and keys)."""
    ttl = (body.get("spec") or {}).get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        return
    finished = st.parse_timestamp(status.get("completionTime")) or time.time()
    remaining = finished + ttl - time.time()
    if remaining > 0:
        await stopped.wait(remaining)
    if stopped:
        return
    meta = body["metadata"]
    logger.info("ttlSecondsAfterFinished=%d passed: deleting the Workflow", ttl)
    # Retried here, not by supervise: that would repeat fail's status, Event and counters;
    # a bounded number of times (about 3 minutes), then said and left to the user.
    attempt = 0
    while not stopped:
        try:
            await operator.delete_workflow(meta["namespace"], meta["name"])
            return
        except Exception as exc:
            if not is_transient(exc):
                raise
            if attempt >= TTL_DELETE_ATTEMPTS:
                logger.error(
                    "cannot delete the Workflow after %d attempts (%s: %s): delete it "
                    "yourself (kubectl delete workflow %s)",
                    attempt, type(exc).__name__, exc, meta["name"],
                )  # fmt: skip
                return
            delay = backoff_delay_s(attempt)
            attempt += 1
            logger.warning(
                "cannot delete the Workflow (%s: %s); retried in %gs",
                type(exc).__name__,
                exc,
                delay,
            )
            await stopped.wait(delay)


async def cleanup(
    operator: Operator, body: kopf.Body, logger: logging.Logger, retry: int = 0
) -> None:
    """Clean up after a Workflow that goes; an error that passes is retried (doubling
    delay), any other is logged and lets the Workflow go (its finalizer must not stay)."""
    try:
        await _cleanup(operator, body, logger)
    except Exception as exc:
        if is_transient(exc):
            raise kopf.TemporaryError(
                f"cleaning up failed: {type(exc).__name__}: {exc}",
                delay=backoff_delay_s(retry),
            ) from exc
        operator.metrics.reconcile_errors.inc()
        logger.error("cleaning up failed; the Workflow goes anyway", exc_info=exc)


async def _cleanup(operator: Operator, body: kopf.Body, logger: logging.Logger) -> None:
    """The Workflow is going: cancel its run, remove the Pods in its tasks, its Failed Pods
    and its run's Redis keys (the history stays: it is what the planner learns from)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    run_id = (body.get("status") or {}).get("runId") or run_id_for(namespace, name, uid)
    redis = operator.redis
    running = await redis.hget(RunKeys(run_id).meta, "status")
    if is_live(running):
        await launcher.cancel(redis, run_id, "the Workflow was deleted")
    await release_run(operator, body, run_id, keep_failed=False)
    if is_live(running):
        await launcher.force_end(redis, run_id)  # records it as cancelled in the history
    await delete_run_keys(redis, run_id, message_key(run_id))
    operator.metrics.forget(uid)
    logger.info("Workflow deleted: run %s cancelled, its busy Pods and keys removed", run_id)


async def run_pool(redis: Any, run_id: str) -> str | None:
    """The pool a run was launched into (its meta, live or in the history); None when Redis
    knows no such run (not launched yet, or its keys are gone)."""
    for meta in (RunKeys(run_id).meta, hist_run(run_id, "meta")):
        pool = await redis.hget(meta, "pool")
        if pool:
            return pool.decode() if isinstance(pool, bytes) else str(pool)
    return None


def _pool_of_spec(operator: Operator, body: kopf.Body) -> str | None:
    """The pool the Workflow's spec leads to (its run's own record is gone from Redis); None
    for a spec that does not parse."""
    try:
        spec = parse_spec(body.get("spec"), default_image=operator.config.worker_image)
    except SpecError:
        return None
    return pool_for(body["metadata"]["namespace"], operator.pool_settings(spec))


async def release_run(
    operator: Operator, body: kopf.Body, run_id: str, *, keep_failed: bool
) -> None:
    """Free what a run holds in its shared pool: Pods still in its tasks are deleted and,
    unless ``keep_failed``, the Failed (kept for ``kubectl logs`` until its Workflow goes) and
    Pending Pods created for it. Idle Pods stay: they serve the pool's next runs."""
    namespace = body["metadata"]["namespace"]
    pool = await run_pool(operator.redis, run_id) or _pool_of_spec(operator, body)
    if pool is None:
        return
    backend = operator.pools.live_backend(pool) or operator.pools.backend(
        namespace=namespace,
        pool=pool,
        settings=operator.pool_settings(None),  # lists and deletes only: no Pod is made
        owner=None,
        redis_url_secret=operator.config.redis_url_secret,
    )
    try:
        await stop_busy_workers(operator.redis, backend, run_id)
        if not keep_failed:
            gone = {"Failed", "Pending"}
            await remove_pods(backend, metrics=operator.metrics, phases=gone, run_id=run_id)
    except KubernetesBackendError as exc:
        operator.metrics.api_errors.labels("delete_pods").inc()
        log.warning("cannot remove the worker Pods of run %s: %s", run_id, exc)
