"""The kopf handlers: one daemon per Workflow drives its whole life, a delete handler cleans up.

The daemon is idempotent and resumable; everything it needs to continue is in ``.status``
and in Redis:

* no ``status.runId``: plan and launch (phase Pending -> Planning -> Running). The run id is
  derived from the Workflow's name and uid, so a launch that happened before a crash is
  found in Redis and adopted instead of repeated;
* ``Running``: run the scaler for the Workflow's worker pool (Pods named from the Workflow's
  uid; existing ones adopted), mirror progress into ``.status`` and wait for the run's end
  on its result list; enforce ``timeoutSeconds`` (else the operator's default timeout);
* ended: final status, Events, idle Pods removed; after ``ttlSecondsAfterFinished`` the
  Workflow is deleted (like a Job), which runs the delete handler.

Operator restart: kopf starts the daemon again for every Workflow; a Running one resumes
following its run, its Pods are adopted, no work is duplicated. No error escapes the daemon
(no crash loop, no retry storm): an error that passes (the API server or Redis busy or away)
is retried with a doubling, capped delay; any other ends the Workflow ``Failed`` with a
condition and an Event (``InternalError`` for an error nobody foresaw), its run cancelled and
its Pods released. Messages are bounded; a long one is kept whole in Redis.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client

from dagkube import planning
from dagkube.dag import DagSpec
from dagkube.errors import DagkubeError, RunTimeout
from dagkube.kubernetes.backend import (
    KubernetesBackend,
    KubernetesBackendError,
    StuckPod,
    stuck_pods,
)
from dagkube.kubernetes.pods import (
    REDIS_CA_FILE,
    WORKER_REDIS_CA_KEY,
    WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY,
    build_worker_redis_secret,
)
from dagkube.kubernetes.workflow_cr import ENDED_PHASES, GROUP, PLURAL, VERSION, Phase
from dagkube.metrics.history import load_snapshot
from dagkube.planning.model import Plan
from dagkube.runtime import acl, launcher
from dagkube.runtime.connection import with_ca_file
from dagkube.runtime.keys import (
    NAMESPACES,
    PoolKeys,
    RunKeys,
    hist_run,
    namespaced,
    worker_proc,
)
from dagkube.runtime.scaler import Scaler, WorkerHandle
from dagkube_operator import status as st
from dagkube_operator.config import OperatorConfig
from dagkube_operator.metrics import OperatorMetrics
from dagkube_operator.reasons import (
    EVENT_MESSAGE_LIMIT_BYTES,
    MESSAGE_LIMIT_BYTES,
    Reason,
    WorkflowFailed,
    bounded,
    bounded_status,
    reason_of,
)
from dagkube_operator.source import BuildSettings, build_dag, load_stored_dag
from dagkube_operator.spec import SpecError, WorkflowSpec, parse_spec
from dagkube_operator.transient import StatusNotWritten, backoff_delay_s, is_transient

# Worker Pods outlive their run's deadline by this much at most: the operator cancels the run
# at the deadline and deletes its Pods after a grace; the kubelet's activeDeadlineSeconds only
# stops the ones it could not (an operator that is down, a Pod it failed to delete).
WORKER_DEADLINE_MARGIN_S = 120
# A namespace's worker user is looked for in Redis this often while its runs go on, and made
# again from its Secret when Redis lost it (a restart): workers re-authenticate when they
# reconnect, so that must happen within their reconnection window.
CREDENTIALS_CHECK_S = 5.0
TTL_DELETE_ATTEMPTS = 10  # a finished Workflow's deletion, retried with backoff this often

log = logging.getLogger("dagkube.operator")


def run_id_for(namespace: str, name: str, uid: str) -> str:
    """The run id of a Workflow: stable across operator restarts, ``<namespace>.<rest>`` so
    that its keys live under its namespace's prefix (the one its workers' Redis user may
    touch), the rest a valid label value without a '.'."""
    stem = name[:40].replace(".", "-").rstrip("-")
    return namespaced(namespace, f"{stem}-{uid.replace('-', '')[:8]}")


def pool_for(namespace: str, uid: str) -> str:
    """Each Workflow has its own worker pool (its Pods serve only its run), in its namespace."""
    return namespaced(namespace, f"wf-{uid}")


def message_key(run_id: str) -> str:
    """Where the whole of a message too long for ``.status`` is kept (the run's TTL)."""
    return f"{RunKeys(run_id).prefix}:message"


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


@dataclass(frozen=True)
class Deadline:
    """When a run is cancelled, and the message that says which setting set the limit."""

    at: float  # seconds since the epoch
    message: str


def run_deadline(
    started: float, *, spec_timeout_s: int | None, default_timeout_s: float
) -> Deadline | None:
    """The deadline of a run started at ``started``: ``spec.timeoutSeconds`` when set, else the
    operator's default (so a run whose workers keep dying still ends); None: no limit at all."""
    if spec_timeout_s:
        return Deadline(
            started + spec_timeout_s, f"timed out after {spec_timeout_s}s (spec.timeoutSeconds)"
        )
    if default_timeout_s > 0:
        return Deadline(
            started + default_timeout_s,
            f"timed out after {default_timeout_s:g}s (the operator's default timeout; "
            "set spec.timeoutSeconds to change it)",
        )
    return None


def worker_deadline_s(*, spec_timeout_s: int | None, default_timeout_s: float) -> int | None:
    """``activeDeadlineSeconds`` of a run's worker Pods: the run's timeout (the same rule as
    :func:`run_deadline`) plus a margin; None when the run has no time limit. A Pod's deadline
    counts from its own start, so it is never earlier than the run's."""
    timeout = run_deadline(0.0, spec_timeout_s=spec_timeout_s, default_timeout_s=default_timeout_s)
    return None if timeout is None else math.ceil(timeout.at) + WORKER_DEADLINE_MARGIN_S


class CountingBackend(KubernetesBackend):
    """The Kubernetes backend, counting the Pods it creates into the operator's metrics."""

    metrics: OperatorMetrics

    async def start_worker(
        self, memory_mib: int, prewarm_for: str | None = None, demand_for: str | None = None
    ) -> WorkerHandle:
        try:
            handle = await super().start_worker(memory_mib, prewarm_for, demand_for)
        except KubernetesBackendError:
            self.metrics.api_errors.labels("create_pod").inc()
            raise
        self.metrics.pods_created.labels(f"{memory_mib}Mi").inc()
        if prewarm_for:
            self.metrics.pods_prewarmed.inc()
        return handle


@dataclass
class Operator:
    """Shared state of the handlers: settings, clients, metrics."""

    config: OperatorConfig
    redis: Any
    api: client.ApiClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    ready: bool = False
    builds: asyncio.Semaphore = field(init=False)  # builds running at once
    # Namespace -> when its worker user was last seen in Redis (see worker_credentials).
    _credentials: dict[str, float] = field(init=False, default_factory=dict)
    _credentials_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.builds = asyncio.Semaphore(self.config.max_concurrent_builds)

    # ------------------------------------------------------------------ worker credentials
    async def worker_credentials(self, namespace: str) -> tuple[str, str]:
        """The Secret (name, key) with the Redis URL of ``namespace``'s worker user, which may
        touch that namespace's keys only (dagkube.runtime.acl): made with the user the first
        time, its user re-applied from it after that (a new version's rules, or a Redis that
        restarted and forgot its users: ACL users live in memory). Checked at most every
        CREDENTIALS_CHECK_S per namespace; worker Pods read the URL from the Secret."""
        if not self.config.worker_users:  # one shared credential (a Redis without ACL users)
            return self.config.redis_url_secret
        secret = (WORKER_REDIS_SECRET, WORKER_REDIS_SECRET_KEY)
        if time.monotonic() - self._credentials.get(namespace, -1e9) < CREDENTIALS_CHECK_S:
            return secret
        async with self._credentials_lock:
            if time.monotonic() - self._credentials.get(namespace, -1e9) < CREDENTIALS_CHECK_S:
                return secret
            user = acl.worker_user(namespace).name
            known = namespace in self._credentials
            if known and await self.redis.execute_command("ACL", "GETUSER", user) is not None:
                self._credentials[namespace] = time.monotonic()
                return secret
            core: Any = client.CoreV1Api(self.api)
            if await self._user_from_secret(core, namespace):
                if known:
                    log.warning("Redis had lost worker user %s: applied it again", user)
            else:
                _, url = await acl.ensure_worker_user(self.redis, self.config.redis_url, namespace)
                ca_pem = None
                if self.config.redis_ca_file:  # TLS: the Pods verify Redis with the CA
                    with during(f"reading the Redis CA {self.config.redis_ca_file}"):
                        ca_pem = Path(self.config.redis_ca_file).read_text()
                    url = with_ca_file(url, REDIS_CA_FILE)
                with during(f"creating Secret {WORKER_REDIS_SECRET} in namespace {namespace}"):
                    try:
                        await core.create_namespaced_secret(
                            namespace, build_worker_redis_secret(namespace, url, ca_pem)
                        )
                    except client.ApiException as exc:
                        if exc.status != 409:
                            raise
                        # Another operator made it meanwhile: its password is the one handed out.
                        await self._user_from_secret(core, namespace)
                log.info("namespace %s: made Redis user %s and Secret %s", namespace, user,
                         WORKER_REDIS_SECRET)  # fmt: skip
            if not known:
                await self.redis.sadd(NAMESPACES, namespace)  # its history on /metrics
            self._credentials[namespace] = time.monotonic()
        return secret

    async def _user_from_secret(self, core: Any, namespace: str) -> bool:
        """Apply the namespace's worker user with the password in its Secret; False when there
        is no such Secret yet."""
        with during(f"reading Secret {WORKER_REDIS_SECRET} in namespace {namespace}"):
            try:
                found = await core.read_namespaced_secret(WORKER_REDIS_SECRET, namespace)
            except client.ApiException as exc:
                if exc.status == 404:
                    return False
                raise
        encoded = (found.data or {}).get(WORKER_REDIS_SECRET_KEY)
        if not encoded:
            return False
        url = base64.b64decode(encoded).decode()
        if self.worker_ca_secret and WORKER_REDIS_CA_KEY not in (found.data or {}):
            log.warning(
                "Secret %s in namespace %s has no %s (made before Redis had TLS): its Pods cannot "
                "reach Redis; delete the Secret and the operator makes it again",
                WORKER_REDIS_SECRET, namespace, WORKER_REDIS_CA_KEY,
            )  # fmt: skip
        await acl.ensure_worker_user(
            self.redis, self.config.redis_url, namespace, [acl.url_password(url)]
        )
        return True

    @property
    def worker_ca_secret(self) -> tuple[str, str] | None:
        """Where worker and build Pods find a TLS Redis' CA (their namespace's worker Secret,
        see :meth:`worker_credentials`); None without TLS."""
        return (WORKER_REDIS_SECRET, WORKER_REDIS_CA_KEY) if self.config.redis_ca_file else None

    # ------------------------------------------------------------------ Kubernetes
    async def patch_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """Merge-patch ``.status`` (the status subresource), its messages bounded."""
        # Custom resources take JSON merge patches (the client would pick strategic merge).
        api: Any = client.CustomObjectsApi(self.api)
        try:
            await api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                name,
                {"status": bounded_status(status)},
                _content_type="application/merge-patch+json",
            )
        except client.ApiException as exc:
            if exc.status == 404:  # deleted meanwhile: nothing left to report on
                return
            self.metrics.api_errors.labels("patch_status").inc()
            raise StatusNotWritten(
                f"cannot patch the status of {namespace}/{name}: {exc.status} {exc.reason}: "
                f"{bounded(str(exc.body), limit_bytes=500)}"
            ) from exc

    def event(
        self,
        body: kopf.Body,
        reason: Reason,
        message: str,
        *,
        warning: bool = False,
        full_text_in: str | None = None,
    ) -> None:
        """Post an Event: ``reason`` from the fixed set, ``message`` bounded."""
        text = bounded(
            message,
            limit_bytes=EVENT_MESSAGE_LIMIT_BYTES,
            full_text_in=full_text_in or "the Workflow's .status.message",
        )
        (kopf.warn if warning else kopf.info)(body, reason=Reason(reason).value, message=text)

    async def keep_full_text(self, run_id: str, text: str) -> str | None:
        """Keep ``text`` whole in Redis (with the run's TTL) when too long for ``.status``;
        where it is, None when it fits."""
        if len(text.encode()) <= MESSAGE_LIMIT_BYTES:
            return None
        key = message_key(run_id)
        await self.redis.set(key, text, ex=self.config.run_ttl_s)
        return f"Redis key {key}"

    async def delete_workflow(self, namespace: str, name: str) -> None:
        """Delete the Workflow; one already gone counts as deleted. Any other refusal (a 403
        until the operator's Role allows it, a 5xx) is raised: the caller retries it."""
        api = client.CustomObjectsApi(self.api)
        try:
            await api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except client.ApiException as exc:
            if exc.status != 404:
                self.metrics.api_errors.labels("delete_workflow").inc()
                raise
            log.debug("Workflow %s/%s was already deleted", namespace, name)

    def backend(
        self,
        spec: WorkflowSpec | None,
        *,
        namespace: str,
        name: str,
        uid: str,
        run_id: str,
        redis_url_secret: tuple[str, str] | None = None,
    ) -> CountingBackend:
        """The run's pool of worker Pods; ``redis_url_secret``: where they read their Redis
        URL (the namespace's worker user, :meth:`worker_credentials`), needed only by a backend
        that creates Pods."""
        backend = CountingBackend(
            self.api,
            namespace=namespace,
            pool=pool_for(namespace, uid),
            image=(spec.image if spec else None) or self.config.worker_image,
            redis_url_secret=redis_url_secret or (WORKER_REDIS_SECRET, WORKER_REDIS_SECRET_KEY),
            redis_ca_secret=self.worker_ca_secret,
            max_workers=(spec.max_workers if spec else None) or self.config.max_workers,
            run_id=run_id,
            owner={"name": name, "uid": uid},
            idle_timeout_s=self.config.idle_timeout_s,
            memory_per_cpu_mib=spec.memory_per_cpu_mib if spec else 1792,
            max_cpu=spec.max_cpu if spec else 6.0,
            startup_delay_s=self.config.startup_delay_s,
            ephemeral_storage_mib=self.config.worker_ephemeral_storage_mib,
            active_deadline_s=worker_deadline_s(
                spec_timeout_s=spec.timeout_s if spec else None,
                default_timeout_s=self.config.default_timeout_s,
            ),
        )
        backend.metrics = self.metrics
        return backend

    # ------------------------------------------------------------------ the life of a run
    async def supervise(
        self, body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger
    ) -> None:
        """Drive the Workflow to its end. An error that passes is retried after a doubling
        delay (capped); a WorkflowFailed, or any other error (InternalError), ends it Failed.
        Nothing escapes to kopf, which would run the whole build again every few seconds."""
        failure: WorkflowFailed | None = None
        attempt = 0
        while not stopped:
            try:
                if failure is None:
                    await self._drive(body, stopped, logger)
                else:
                    await self._fail(body, failure, stopped, logger)
                return
            except Exception as exc:
                if isinstance(exc, WorkflowFailed) and failure is None:
                    failure = exc
                elif is_transient(exc):
                    delay = backoff_delay_s(attempt)
                    attempt += 1
                    logger.warning(
                        "%s: %s (passing, retried in %gs)", type(exc).__name__, exc, delay
                    )
                    await stopped.wait(delay)
                elif failure is None:
                    logger.error("unexpected error: the Workflow fails", exc_info=exc)
                    self.metrics.reconcile_errors.inc()
                    failure = internal_error(exc)
                else:  # not even the failure can be recorded: say so, and do not loop
                    logger.error("cannot record the failure (%s)", failure, exc_info=exc)
                    self.metrics.reconcile_errors.inc()
                    return

    async def _drive(
        self, body: kopf.Body, stopped: kopf.DaemonStopped, logger: logging.Logger
    ) -> None:
        uid = body["metadata"]["uid"]
        status = dict(body.get("status") or {})
        phase = status.get("phase") or Phase.PENDING
        self.metrics.set_phase(uid, phase)
        if phase not in ENDED_PHASES:
            spec = parse_spec(
                body.get("spec"),
                allowed_classes=self.config.allowed_classes,
                max_workers_limit=self.config.max_workers_limit,
                allowed_images=self.config.allowed_images,
                default_image=self.config.worker_image,
                allowed_sources=self.config.allowed_sources,
                allowed_modules=self.config.allowed_modules,
            )
            run_id = status.get("runId")
            if not run_id:
                status, run_id = await self._start(body, spec, status, logger)
            status = await self._follow(body, spec, run_id, status, stopped, logger)
        if status.get("phase") in ENDED_PHASES:
            await self._expire(body, status, stopped, logger)

    async def _start(
        self,
        body: kopf.Body,
        spec: WorkflowSpec,
        status: dict[str, Any],
        logger: logging.Logger,
    ) -> tuple[dict[str, Any], str]:
        """Build the DAG, plan and launch; the new status and the run id (a WorkflowFailed
        when the source does not build or the plan is rejected)."""
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        run_id = run_id_for(namespace, name, uid)
        began = time.monotonic()
        now = time.time()
        status = {**status, **st.planning_status(status.get("conditions"), now)}
        with during("writing the Planning status"):
            await self.patch_status(namespace, name, status)
        self.metrics.set_phase(uid, Phase.PLANNING)
        existing = await self.redis.get(RunKeys(run_id).plan) or await self.redis.get(
            hist_run(run_id, "plan")
        )
        if existing is not None:  # launched before a restart, status not yet written
            with during(f"reading the plan of run {run_id}"):
                plan = await asyncio.to_thread(Plan.model_validate_json, existing)
            total = int(await self.redis.hget(RunKeys(run_id).meta, "tasks_total") or 0)
            total = total or len(plan.tasks)
            logger.info("run %s was launched before a restart: following it", run_id)
        else:
            with during(f"loading the DAG from spec.source.{spec.source.kind}"):
                dag = await self._load_dag(spec, namespace=namespace, name=name, uid=uid)
            with during("planning"):
                plan = await self._plan(dag, spec, namespace)
            with during(f"launching run {run_id}"):
                await launcher.launch(
                    self.redis,
                    dag,
                    plan,
                    pool_for(namespace, uid),
                    run_id=run_id,
                    ttl_s=self.config.run_ttl_s,
                    startup_delay_s=self.config.startup_delay_s,
                    enforced=True,  # worker Pods carry their class's limits
                )
            total = len(dag.tasks)
        self.metrics.planning_seconds.observe(time.monotonic() - began)
        status = {
            **status,
            **st.launched_status(run_id, plan, total, status.get("conditions"), now),
        }
        with during("writing the Running status"):
            await self.patch_status(namespace, name, status)
        self.metrics.set_phase(uid, Phase.RUNNING)
        self.event(body, Reason.STARTED, f"run {run_id}: {status['message']}")
        return status, run_id

    async def _load_dag(
        self, spec: WorkflowSpec, *, namespace: str, name: str, uid: str
    ) -> DagSpec:
        if spec.source.kind == "ref":
            dag = await load_stored_dag(self.redis, spec.source)
        else:
            with during(f"making the Redis credentials of namespace {namespace}"):
                secret = await self.worker_credentials(namespace)
            async with self.builds:  # build Pods: a few at a time
                dag = await build_dag(
                    self.api,
                    self.redis,
                    spec.source,
                    namespace=namespace,
                    name=name,
                    uid=uid,
                    image=spec.image or self.config.worker_image,
                    redis_url_secret=secret,
                    redis_ca_secret=self.worker_ca_secret,
                    settings=BuildSettings(
                        timeout_s=self.config.build_timeout_s,
                        memory_mib=self.config.build_memory_mib,
                        cpu=self.config.build_cpu,
                    ),
                )
        if spec.retries is not None:
            for task in dag.tasks.values():
                task.retries = max(task.retries, spec.retries)
        return dag

    async def _plan(self, dag: DagSpec, spec: WorkflowSpec, namespace: str) -> Plan:
        # The history of the Workflow's namespace: its runs' workers write it there.
        history = await load_snapshot(self.redis, dag.structure_hash, namespace=namespace)
        options = planning.PlanningOptions.for_run(
            spec.classes_mib,
            sla=spec.sla,
            history=history,
            memory_per_cpu_mib=spec.memory_per_cpu_mib,
            max_cpu=spec.max_cpu,
            max_workers=spec.max_workers or self.config.max_workers,
            idle_timeout_s=self.config.idle_timeout_s,
            startup_delay_s=self.config.startup_delay_s,
            # Unlike local workers, a worker Pod's CPU limit is enforced: say so even though it
            # is the default, since the local runtime and `dagkube plan` decide it per machine.
            cpu_enforced=True,
            optimizations=spec.optimizations,
        )
        try:  # a large DAG plans for seconds: off the event loop, which serves every Workflow
            return await asyncio.to_thread(planning.plan, dag, spec.planner, options)
        except DagkubeError as exc:
            raise SpecError(f"planning failed: {exc}", reason=Reason.PLAN_REJECTED) from exc

    async def _follow(
        self,
        body: kopf.Body,
        spec: WorkflowSpec,
        run_id: str,
        status: dict[str, Any],
        stopped: kopf.DaemonStopped,
        logger: logging.Logger,
    ) -> dict[str, Any]:
        """Scale the run's pool and mirror its progress until it ends or the daemon stops."""
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        with during(f"making the Redis credentials of namespace {namespace}"):
            secret = await self.worker_credentials(namespace)
        backend = self.backend(
            spec, namespace=namespace, name=name, uid=uid, run_id=run_id, redis_url_secret=secret
        )
        scaler = Scaler(self.redis, pool_for(namespace, uid), backend)
        scaling = asyncio.create_task(scaler.run(), name=f"scaler {namespace}/{name}")
        self.metrics.live_pools[pool_for(namespace, uid)] = backend  # its live state on /metrics
        # The deadline counts from the start written in .status, the cancellation's grace from
        # the moment written in Redis: a restarted daemon enforces the same times.
        started = st.parse_timestamp(status.get("startTime")) or time.time()
        deadline = run_deadline(
            started,
            spec_timeout_s=spec.timeout_s,
            default_timeout_s=self.config.default_timeout_s,
        )
        shown: dict[str, Any] = {}
        ended: str | None = None
        failure_reason: Reason | None = None
        reported: set[tuple[str, str]] = set()  # (Pod, reason) already posted as an Event
        try:
            while not stopped:
                if deadline is not None and time.time() >= deadline.at:
                    ended = await self._time_out(run_id, deadline.message, logger)
                    break
                stuck = await self._watch_pending(body, backend, status, reported)
                if (
                    stuck is not None
                    and time.time() - stuck.created_at > self.config.pending_timeout_s
                ):
                    message = (
                        f"worker Pod {stuck.name} stayed Pending for more than "
                        f"{self.config.pending_timeout_s:g}s: {stuck.reason}: {stuck.message}"
                    )
                    logger.warning("run %s: %s; ending it", run_id, message)
                    ended = await launcher.cancel_and_end(
                        self.redis, run_id, message, grace_s=self.config.cancel_grace_s
                    )
                    failure_reason = reason_of(stuck.reason, Reason.WORKERS_PENDING)
                    break
                wait_s = self.config.progress_every_s
                if deadline is not None:
                    wait_s = max(0.05, min(wait_s, deadline.at - time.time()))
                with contextlib.suppress(RunTimeout):
                    ended = await launcher.wait_for_end(self.redis, run_id, timeout_s=wait_s)
                if ended is not None:
                    break
                await self._check_run_state(run_id)
                await self.worker_credentials(namespace)  # Redis may have restarted
                with during(f"reading the progress of run {run_id}"):
                    record = await launcher.fetch_run_record(self.redis, run_id)
                progress = st.progress_status(record)
                if progress != shown:
                    try:
                        await self.patch_status(namespace, name, progress)
                    except StatusNotWritten as exc:  # progress is best effort: the run goes on
                        logger.warning("%s (progress not shown; retried)", exc)
                    else:
                        shown = progress
        finally:
            self.metrics.live_pools.pop(pool_for(namespace, uid), None)
            scaler.stop()
            scaling.cancel()
            try:
                with contextlib.suppress(asyncio.CancelledError):  # cancelled just above
                    await scaling
            # Scaler.run retries its own errors, so one here is a bug of the scaler: said, and
            # not raised from this finally, where it would hide how the run ended.
            except Exception as exc:
                self.metrics.reconcile_errors.inc()
                logger.error("run %s: the scaler failed: %s", run_id, exc, exc_info=exc)
        if ended is None:  # the daemon stops (operator shutdown, Workflow deleted)
            return status
        # The ended run's Pods go first: freeing them must not wait on a status write.
        await self._release_pool(backend, keep_failed=True)
        await self._check_run_state(run_id)
        with during(f"reading the record of the ended run {run_id}"):
            record = await launcher.fetch_run_record(self.redis, run_id)
        conditions = status.get("conditions")
        if any(c.get("type") == "WorkersPending" for c in conditions or []):
            conditions = st.pending_condition(conditions, [], time.time())
        final = st.final_status(record, conditions, time.time(), reason=failure_reason)
        full_text_in = await self.keep_full_text(run_id, final["message"])
        final = bounded_status(final, full_text_in)
        with during("writing the final status"):
            await self.patch_status(namespace, name, final)
        status = {**status, **final}
        self.metrics.set_phase(uid, final["phase"])
        self.metrics.finished.labels(final["phase"]).inc()
        succeeded = final["phase"] == Phase.SUCCEEDED
        self.event(
            body,
            Reason.SUCCEEDED if succeeded else Reason.FAILED,
            final["message"],
            warning=not succeeded,
            full_text_in=full_text_in,
        )
        return status

    async def _check_run_state(self, run_id: str) -> None:
        """A WorkflowFailed (RunStateLost) when Redis has neither the live run nor its
        history: it lost its data, or the keys were deleted; nothing is left to follow."""
        if not await self.redis.exists(RunKeys(run_id).meta, hist_run(run_id, "meta")):
            raise WorkflowFailed(
                f"run {run_id}: its state is gone from Redis (neither {RunKeys(run_id).meta} "
                f"nor {hist_run(run_id, 'meta')} exists: Redis lost its data or the keys were "
                "deleted); it cannot be followed: apply the Workflow again to run it",
                reason=Reason.RUN_STATE_LOST,
            )

    async def _watch_pending(
        self,
        body: kopf.Body,
        backend: KubernetesBackend,
        status: dict[str, Any],
        reported: set[tuple[str, str]],
    ) -> StuckPod | None:
        """Report worker Pods the scheduler cannot place or the kubelet cannot start (from
        the scaler's last list of the pool): the ``WorkersPending`` condition and one Warning
        Event per Pod and reason. Returns the oldest such Pod, None when there is none."""
        now = time.time()
        stuck = [
            s
            for s in stuck_pods(backend.last_pods)
            if now - s.created_at >= self.config.pending_report_after_s
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
                    await self.patch_status(
                        meta["namespace"], meta["name"], {"conditions": conditions}
                    )
                except StatusNotWritten as exc:
                    log.warning("%s (the pending condition is retried)", exc)
                else:
                    status["conditions"] = conditions
        for pod in stuck:
            if (pod.name, pod.reason) not in reported:
                reported.add((pod.name, pod.reason))
                self.event(
                    body,
                    reason_of(pod.reason, Reason.WORKERS_PENDING),
                    f"worker Pod {pod.name}: {pod.reason}: {pod.message}",
                    warning=True,
                )
        return stuck[0] if stuck else None

    async def _time_out(self, run_id: str, message: str, logger: logging.Logger) -> str:
        """The run's deadline passed: cancel, give the workers the grace to stop at a task
        boundary, then end the run without them. Whatever state the run was in (no worker
        yet, Pods pending, tasks running), it has ended when this returns."""
        logger.warning("run %s %s: cancelling", run_id, message)
        ended = await launcher.cancel_and_end(
            self.redis, run_id, message, grace_s=self.config.cancel_grace_s
        )
        return ended or "cancelled"

    async def _force_end(self, run_id: str) -> None:
        await launcher.force_end(self.redis, run_id)

    async def _release_pool(self, backend: KubernetesBackend, *, keep_failed: bool) -> None:
        """Remove the pool's Pods (except Failed ones kept for ``kubectl logs`` until the
        Workflow goes) and its Redis keys; the run's own keys expire with their TTL."""
        pool = backend.pool
        try:
            pods = await backend.pods()
            doomed = [
                pod_name
                for pod_name, pod in pods.items()
                if not (keep_failed and (pod.get("status") or {}).get("phase") == "Failed")
            ]
            await asyncio.gather(*(backend.discard(pod_name) for pod_name in doomed))
        except KubernetesBackendError as exc:
            self.metrics.api_errors.labels("delete_pods").inc()
            log.warning("cannot remove the worker Pods of pool %s: %s", pool, exc)
        keys = PoolKeys(pool)
        classes = [int(c) for c in await self.redis.smembers(keys.classes)]
        workers = [w.decode() for w in await self.redis.hkeys(keys.workers)]
        names = [keys.classes, keys.workers, keys.wake, keys.waiting, keys.prewarm]
        names += [keys.queue(m) for m in classes] + [keys.idle(m) for m in classes]
        names += [worker_proc(w, pool) for w in workers]
        await self.redis.delete(*names)

    async def _fail(
        self,
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
        full_text_in = None
        if await self.redis.exists(RunKeys(run_id).meta, hist_run(run_id, "meta")):
            full_text_in = await self.keep_full_text(run_id, str(error))
        message = bounded(str(error), full_text_in=full_text_in)
        if await self.redis.hget(RunKeys(run_id).meta, "status") in (b"running", b"cancelling"):
            await launcher.cancel_and_end(
                self.redis, run_id, message, grace_s=self.config.cancel_grace_s
            )
        backend = self.backend(None, namespace=namespace, name=name, uid=uid, run_id=run_id)
        await self._release_pool(backend, keep_failed=True)
        failed = st.failed_status(error.reason, message, status.get("conditions"), time.time())
        await self.patch_status(namespace, name, failed)
        self.metrics.set_phase(uid, Phase.FAILED)
        self.metrics.finished.labels(Phase.FAILED).inc()
        self.metrics.errors.labels(error.reason.value).inc()
        self.event(body, error.reason, message, warning=True, full_text_in=full_text_in)
        logger.warning("failed (%s): %s", error.reason.value, message)
        await self._expire(body, {**status, **failed}, stopped, logger)

    async def _expire(
        self,
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
        # Retried here, not by supervise: that would repeat _fail's status, Event and counters;
        # a bounded number of times (about 3 minutes), then said and left to the user.
        attempt = 0
        while not stopped:
            try:
                await self.delete_workflow(meta["namespace"], meta["name"])
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

    # ------------------------------------------------------------------ deletion
    async def cleanup(self, body: kopf.Body, logger: logging.Logger, retry: int = 0) -> None:
        """Clean up after a Workflow that goes; an error that passes is retried (doubling
        delay), any other is logged and lets the Workflow go (its finalizer must not stay)."""
        try:
            await self._cleanup(body, logger)
        except Exception as exc:
            if is_transient(exc):
                raise kopf.TemporaryError(
                    f"cleaning up failed: {type(exc).__name__}: {exc}",
                    delay=backoff_delay_s(retry),
                ) from exc
            self.metrics.reconcile_errors.inc()
            logger.error("cleaning up failed; the Workflow goes anyway", exc_info=exc)

    async def _cleanup(self, body: kopf.Body, logger: logging.Logger) -> None:
        """The Workflow is going: cancel its run, remove its Pods and its run's Redis keys
        (the history stays: it is what the planner learns from)."""
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        run_id = (body.get("status") or {}).get("runId") or run_id_for(namespace, name, uid)
        running = await self.redis.hget(RunKeys(run_id).meta, "status")
        if running in (b"running", b"cancelling"):
            await launcher.cancel(self.redis, run_id, "the Workflow was deleted")
        backend = self.backend(None, namespace=namespace, name=name, uid=uid, run_id=run_id)
        await self._release_pool(backend, keep_failed=False)
        if running in (b"running", b"cancelling"):
            await self._force_end(run_id)  # records it as cancelled in the history
        await delete_run_keys(self.redis, run_id)
        self.metrics.forget(uid)
        logger.info("Workflow deleted: run %s cancelled, Pods and keys removed", run_id)


async def delete_run_keys(redis: Any, run_id: str) -> None:
    keys = RunKeys(run_id)
    dynamic = [k.decode() for k in await redis.smembers(keys.keyset)]
    fixed = [
        message_key(run_id),
        keys.meta,
        keys.dag,
        keys.plan,
        keys.outputs,
        keys.constants,
        keys.done,
        keys.edges,
        keys.dep_counts,
        keys.result,
        keys.started,
        keys.keyset,
    ]
    await redis.unlink(*fixed, *dynamic)


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
        await operator.supervise(body, stopped, logger)

    @kopf.on.delete(GROUP, VERSION, PLURAL, registry=registry, backoff=2.0)
    async def workflow_deleted(body: kopf.Body, logger: Any, retry: int, **_: Any) -> None:
        await operator.cleanup(body, logger, retry)
