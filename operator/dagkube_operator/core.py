"""The operator's shared state and the primitives every step of a Workflow's life uses.

:class:`Operator` holds the settings, the Redis and Kubernetes clients and the metrics, and
does the small writes the steps share: a status patch, an Event, a long message kept in Redis,
a Workflow deleted, a namespace's worker credentials made; its worker pools are in
:mod:`dagkube_operator.pools`. The
steps themselves (launching, following, ending) live in their own modules and take the
Operator as their first argument.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kopf
from kubernetes_asyncio import client

from dagkube.kubernetes.pods import (
    REDIS_CA_FILE,
    WORKER_REDIS_CA_KEY,
    WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY,
    build_worker_redis_secret,
)
from dagkube.kubernetes.workflow_cr import GROUP, PLURAL, VERSION, WorkflowSpec
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB
from dagkube.store import acl
from dagkube.store.connection import with_ca_file
from dagkube.store.keys import NAMESPACES
from dagkube_operator.config import OperatorConfig
from dagkube_operator.metrics import OperatorMetrics
from dagkube_operator.pools import SharedPools
from dagkube_operator.reasons import (
    EVENT_MESSAGE_LIMIT_BYTES,
    MESSAGE_LIMIT_BYTES,
    Reason,
    bounded,
    bounded_status,
    during,
)
from dagkube_operator.runs import PoolSettings, message_key
from dagkube_operator.transient import StatusNotWritten

# A namespace's worker user is looked for in Redis this often while its runs go on, and made
# again from its Secret when Redis lost it (a restart): workers re-authenticate when they
# reconnect, so that must happen within their reconnection window.
CREDENTIALS_CHECK_S = 5.0

log = logging.getLogger("dagkube.operator")


@dataclass
class Operator:
    """Shared state of the steps of every Workflow: settings, clients, metrics."""

    config: OperatorConfig
    redis: Any
    api: client.ApiClient
    metrics: OperatorMetrics = field(default_factory=OperatorMetrics)
    ready: bool = False
    builds: asyncio.Semaphore = field(init=False)  # builds running at once
    pools: SharedPools = field(init=False)  # the worker pools whose scalers run
    # Namespace -> when its worker user was last seen in Redis (see worker_credentials).
    _credentials: dict[str, float] = field(init=False, default_factory=dict)
    _credentials_lock: asyncio.Lock = field(init=False, default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.builds = asyncio.Semaphore(self.config.max_concurrent_builds)
        self.pools = SharedPools(self.api, self.redis, self.metrics, self.worker_ca_secret)

    # ------------------------------------------------------------------ worker credentials
    async def worker_credentials(self, namespace: str) -> tuple[str, str]:
        """The Secret (name, key) with the Redis URL of ``namespace``'s worker user, which may
        touch that namespace's keys only (dagkube.store.acl): made with the user the first
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

    def pool_settings(self, spec: WorkflowSpec | None) -> PoolSettings:
        """What shapes the worker Pods of a Workflow of ``spec`` (None: the defaults): the
        Workflows of a namespace with equal settings share a pool (:mod:`.pools`)."""
        return PoolSettings(
            image=(spec.image if spec else None) or self.config.worker_image,
            memory_per_cpu_mib=spec.memory_per_cpu_mib if spec else DEFAULT_MEMORY_PER_CPU_MIB,
            max_cpu=spec.max_cpu if spec else DEFAULT_MAX_CPU,
            idle_timeout_s=self.config.idle_timeout_s,
            startup_delay_s=self.config.startup_delay_s,
            ephemeral_storage_mib=self.config.worker_ephemeral_storage_mib,
        )
