"""The kopf handlers: one daemon per Workflow drives its whole life, a delete handler cleans up.

The daemon is idempotent and resumable; everything it needs to continue is in ``.status``
and in Redis:

* no ``status.runId``: plan and launch (phase Pending -> Planning -> Running). The run id is
  derived from the Workflow's name and uid, so a launch that happened before a crash is
  found in Redis and adopted instead of repeated;
* ``Running``: join the run to its worker pool, shared by the namespace's Workflows whose
  Pods would be the same (one scaler per pool; Pods named from the pool's ConfigMap, existing
  ones adopted), mirror progress into ``.status`` and wait for the run's end on its result
  list; enforce ``timeoutSeconds`` (else the operator's default timeout);
* ended: final status, Events, Pods still in its tasks deleted (idle ones stay in the pool
  for the next runs until the idle timeout); after ``ttlSecondsAfterFinished`` the Workflow
  is deleted (like a Job), which runs the delete handler.

Operator restart: kopf starts the daemon again for every Workflow; a Running one resumes
following its run, its Pods are adopted, no work is duplicated. No error escapes the daemon
(no crash loop, no retry storm): an error that passes (the API server or Redis busy or away)
is retried with a doubling, capped delay; any other ends the Workflow ``Failed`` with a
condition and an Event (``InternalError`` for an error nobody foresaw), its run cancelled and
its busy Pods released. Messages are bounded; a long one is kept whole in Redis.

Where the steps live: this module registers the kopf handlers and drives the phases
(:func:`supervise`, launching); :mod:`dagkube_operator.follow` follows a Running run;
:mod:`dagkube_operator.teardown` fails, expires and cleans up; :mod:`dagkube_operator.core`
holds the shared state and its writes (status, Events, worker credentials, worker pools).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import kopf

from dagkube import planning
from dagkube.dag import DagSpec
from dagkube.errors import DagkubeError
from dagkube.kubernetes.workflow_cr import (
    ENDED_PHASES,
    GROUP,
    PLURAL,
    VERSION,
    Phase,
    WorkflowSpec,
)
from dagkube.metrics.history import load_snapshot
from dagkube.planning.model import Plan
from dagkube.runtime import launcher
from dagkube.store.keys import RunKeys, hist_run
from dagkube_operator import status as st
from dagkube_operator.core import Operator
from dagkube_operator.follow import follow
from dagkube_operator.pools import idle_workers
from dagkube_operator.reasons import Reason, WorkflowFailed, during, internal_error
from dagkube_operator.runs import pool_for, run_id_for
from dagkube_operator.source import BuildSettings, build_dag, load_stored_dag
from dagkube_operator.spec import SpecError, parse_spec
from dagkube_operator.teardown import cleanup, expire, fail
from dagkube_operator.transient import backoff_delay_s, is_transient


def register(registry: kopf.OperatorRegistry, operator: Operator) -> None:
    """Attach the handlers to ``registry`` (a fresh one per operator: tests run several)."""

    @kopf.daemon(
        GROUP,
        VERSION,
        PLURAL,
        registry=registry,
        cancellation_timeout=15.0,
        backoff=5.0,
    )
    async def workflow_daemon(
        body: kopf.Body, stopped: kopf.DaemonStopped, logger: Any, **_: Any
    ) -> None:
        await supervise(operator, body, stopped, logger)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, backoff=2.0)
    async def workflow_deleted(body: kopf.Body, logger: Any, retry: int, **_: Any) -> None:
        await cleanup(operator, body, logger, retry)


async def supervise(
    operator: Operator, body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger
) -> None:
    """Drive the Workflow to its end. An error that passes is retried after a doubling
    delay (capped); a WorkflowFailed, or any other error (InternalError), ends it Failed.
    Nothing escapes to kopf, which would run the whole build again every few seconds."""
    failure: WorkflowFailed | None = None
    attempt = 0
    while not stopped:
        try:
            if failure is None:
                await _drive(operator, body, stopped, logger)
            else:
                await fail(operator, body, failure, stopped, logger)
            return
        except Exception as exc:
            if isinstance(exc, WorkflowFailed) and failure is None:
                failure = exc
            elif is_transient(exc):
                delay = backoff_delay_s(attempt)
                attempt += 1
                logger.warning("%s: %s (passing, retried in %gs)", type(exc).__name__, exc, delay)
                await stopped.wait(delay)
            elif failure is None:
                logger.error("unexpected error: the Workflow fails", exc_info=exc)
                operator.metrics.reconcile_errors.inc()
                failure = internal_error(exc)
            else:  # not even the failure can be recorded: say so, and do not loop
                logger.error("cannot record the failure (%s)", failure, exc_info=exc)
                operator.metrics.reconcile_errors.inc()
                return


async def _drive(
    operator: Operator, body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger
) -> None:
    """One pass over the phases, from the one in ``.status``: launch when no run is known,
    follow the run until it ends, then wait out the TTL."""
    uid = body["metadata"]["uid"]
    status = dict(body.get("status") or {})
    phase = status.get("phase") or Phase.PENDING
    operator.metrics.set_phase(uid, phase)
    if phase not in ENDED_PHASES:
        config = operator.config
        spec = parse_spec(
            body.get("spec"),
            allowed_classes=config.allowed_classes,
            max_workers_limit=config.max_workers_limit,
            allowed_images=config.allowed_images,
            default_image=config.worker_image,
            allowed_sources=config.allowed_sources,
            allowed_modules=config.allowed_modules,
        )
        run_id = status.get("runId")
        if not run_id:
            status, run_id = await _start(operator, body, spec, status, logger)
        status = await follow(operator, body, spec, run_id, status, stopped, logger)
    if status.get("phase") in ENDED_PHASES:
        await expire(operator, body, status, stopped, logger)


async def _start(
    operator: Operator,
    body: kopf.Body,
    spec: WorkflowSpec,
    status: dict[str, Any],
    logger: logging.Logger,
) -> tuple[dict[str, Any], str]:
    """Build the DAG, plan and launch; the new status and the run id (a WorkflowFailed
    when the source does not build or the plan is rejected)."""
    meta = body["metadata"]
    name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
    redis = operator.redis
    run_id = run_id_for(namespace, name, uid)
    began = time.monotonic()
    now = time.time()
    status = {**status, **st.planning_status(status.get("conditions"), now)}
    with during("writing the Planning status"):
        await operator.patch_status(namespace, name, status)
    operator.metrics.set_phase(uid, Phase.PLANNING)
    existing = await redis.get(RunKeys(run_id).plan) or await redis.get(hist_run(run_id, "plan"))
    if existing is not None:  # launched before a restart, status not yet written
        with during(f"reading the plan of run {run_id}"):
            plan = await asyncio.to_thread(Plan.model_validate_json, existing)
        total = int(await redis.hget(RunKeys(run_id).meta, "tasks_total") or 0)
        total = total or len(plan.tasks)
        logger.info("run %s was launched before a restart: following it", run_id)
    else:
        with during(f"loading the DAG from spec.source.{spec.source.kind}"):
            dag = await _load_dag(operator, spec, namespace=namespace, name=name, uid=uid)
        pool = pool_for(namespace, operator.pool_settings(spec))
        with during("planning"):
            plan = await _plan(operator, dag, spec, namespace, pool)
        with during(f"launching run {run_id}"):
            await launcher.launch(
                redis,
                dag,
                plan,
                pool,
                run_id=run_id,
                ttl_s=operator.config.run_ttl_s,
                startup_delay_s=operator.config.startup_delay_s,
                enforced=True,  # worker Pods carry their class's limits
            )
        total = len(dag.tasks)
    operator.metrics.planning_seconds.observe(time.monotonic() - began)
    status = {**status, **st.launched_status(run_id, plan, total, status.get("conditions"), now)}
    with during("writing the Running status"):
        await operator.patch_status(namespace, name, status)
    operator.metrics.set_phase(uid, Phase.RUNNING)
    operator.event(body, Reason.STARTED, f"run {run_id}: {status['message']}")
    return status, run_id


async def _load_dag(
    operator: Operator, spec: WorkflowSpec, *, namespace: str, name: str, uid: str
) -> DagSpec:
    """The Workflow's DAG: a stored one read back, else built from its source in a build Pod
    (a few at a time); ``spec.retries`` raises every task's retries to at least that many."""
    config = operator.config
    if spec.source.kind == "ref":
        dag = await load_stored_dag(operator.redis, spec.source)
    else:
        with during(f"making the Redis credentials of namespace {namespace}"):
            secret = await operator.worker_credentials(namespace)
        async with operator.builds:  # build Pods: a few at a time
            dag = await build_dag(
                operator.api,
                operator.redis,
                spec.source,
                namespace=namespace,
                name=name,
                uid=uid,
                image=spec.image or config.worker_image,
                redis_url_secret=secret,
                redis_ca_secret=operator.worker_ca_secret,
                make_room=lambda: operator.pools.make_room(namespace),
                settings=BuildSettings(
                    timeout_s=config.build_timeout_s,
                    memory_mib=config.build_memory_mib,
                    cpu=config.build_cpu,
                ),
            )
    if spec.retries is not None:
        for task in dag.tasks.values():
            task.retries = max(task.retries, spec.retries)
    return dag


async def _plan(
    operator: Operator, dag: DagSpec, spec: WorkflowSpec, namespace: str, pool: str
) -> Plan:
    """Plan the run from the history of the Workflow's namespace (its runs' workers write it
    there) and the idle workers of its pool now (warm starts); a plan the planner rejects is
    a SpecError (PlanRejected)."""
    history = await load_snapshot(operator.redis, dag.structure_hash, namespace=namespace)
    warm_pool = await idle_workers(operator.redis, pool)
    options = planning.PlanningOptions.for_run(
        spec.classes_mib,
        sla=spec.sla,
        history=history,
        memory_per_cpu_mib=spec.memory_per_cpu_mib,
        max_cpu=spec.max_cpu,
        max_workers=spec.max_workers or operator.config.max_workers,
        idle_timeout_s=operator.config.idle_timeout_s,
        warm_pool=warm_pool,
        startup_delay_s=operator.config.startup_delay_s,
        # Unlike local workers, a worker Pod's CPU limit is enforced: say so even though it
        # is the default, since the local runtime and `dagkube plan` decide it per machine.
        cpu_enforced=True,
        optimizations=spec.optimizations,
        objective=spec.objective,
        max_gb_s=spec.max_gb_s,
    )
    try:  # a large DAG plans for seconds: off the event loop, which serves every Workflow
        return await asyncio.to_thread(planning.plan, dag, spec.planner, options)
    except DagkubeError as exc:
        raise SpecError(f"planning failed: {exc}", reason=Reason.PLAN_REJECTED) from exc
