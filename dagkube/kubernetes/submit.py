"""Submitting workflows to Kubernetes: the Workflow manifest, the stored DAG and a handle.

``Workflow.submit()`` stores the DAG in the Redis the operator uses (key ``dk:dag:<id>``, with
a TTL) and creates a Workflow whose ``spec.source.ref`` names it; the returned
:class:`SubmittedWorkflow` follows the object's ``.status`` (a watch, renewed until the end)
and returns the outputs, read from Redis, or raises :class:`TaskFailed`.
The object itself is built from a typed :class:`~dagkube.kubernetes.workflow_cr.WorkflowSpec`
by ``workflow_cr.workflow_manifest``, which ``dagkube manifest`` uses too.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from dagkube import description
from dagkube.dag import DagSpec
from dagkube.errors import DagkubeError, RunTimeout
from dagkube.kubernetes.workflow_cr import (
    ENDED_PHASES,
    GROUP,
    PLURAL,
    VERSION,
    Phase,
    Source,
    WorkflowSpec,
    workflow_manifest,
)
from dagkube.store.keys import stored_dag

STORED_DAG_TTL_S = 7 * 24 * 3600
T = TypeVar("T")
log = logging.getLogger("dagkube.kubernetes")


class SubmitError(DagkubeError):
    """The Kubernetes API refused the Workflow, or the Workflow could not run."""


def dag_id(dag: DagSpec) -> str:
    """Content id of a DAG (its description, code, arguments and constants): 32 hex digits."""
    return description.content_id(dag)


async def store_dag(redis: Any, dag: DagSpec, ttl_s: int = STORED_DAG_TTL_S) -> str:
    """Store a DAG for ``spec.source.ref`` (idempotent: same DAG, same id); returns its id. It
    is stored as a description the operator reads without unpickling (dagkube.description)."""
    identifier = dag_id(dag)
    async with redis.pipeline(transaction=True) as pipe:
        description.store(pipe, stored_dag(identifier), dag, ttl_s=ttl_s)
        await pipe.execute()
    return identifier


def name_stem(name: str) -> str:
    """A DNS-1123 prefix for ``metadata.generateName`` from a workflow's name."""
    stem = re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-")[:50].strip("-")
    return f"{stem or 'workflow'}-"


def _run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def require_client() -> None:
    """Kubernetes submission needs the ``kubernetes`` extra: say so instead of a traceback."""
    try:
        import kubernetes_asyncio  # noqa: F401
    except ModuleNotFoundError:
        raise SubmitError(
            "Talking to Kubernetes needs the kubernetes extra: pip install 'dagkube[kubernetes]'"
        ) from None


class SubmittedWorkflow:
    """A Workflow object in the cluster: its status, and (with the DAG) its outputs."""

    def __init__(
        self,
        name: str,
        namespace: str,
        *,
        dag: DagSpec | None = None,
        redis_url: str | None = None,
        kube_api_url: str | None = None,
    ) -> None:
        self.name = name
        self.namespace = namespace
        self.dag = dag
        self.redis_url = redis_url
        self.kube_api_url = kube_api_url

    def __repr__(self) -> str:
        return f"<SubmittedWorkflow {self.namespace}/{self.name}>"

    # ------------------------------------------------------------------ status
    def get(self) -> dict[str, Any]:
        """The Workflow object as the API returns it now."""
        require_client()
        return _run(self._get())

    def status(self) -> dict[str, Any]:
        return self.get().get("status") or {}

    async def _get(self) -> dict[str, Any]:
        from kubernetes_asyncio import client

        from dagkube.kubernetes.backend import connect

        api = await connect(self.kube_api_url)
        try:
            return await _read(client.CustomObjectsApi(api), self.namespace, self.name)
        finally:
            await api.close()

    def wait(
        self,
        timeout_s: float | None = None,
        on_status: Callable[[dict[str, Any]], None] | None = None,
    ) -> Any:
        """Follow ``.status`` until the Workflow ends; the outputs (when the handle has the
        DAG and a Redis URL), else the final status. Raises :class:`TaskFailed` for a failed
        task, :class:`SubmitError` for a Workflow that could not run, :class:`RunTimeout`."""
        require_client()
        status = _run(self._follow(timeout_s, on_status))
        if status.get("phase") == Phase.SUCCEEDED:
            if self.dag is None or not self.redis_url:
                return status
            return _run(self._outputs(status["runId"]))
        run_id = status.get("runId")
        if run_id and self.redis_url:
            failure = _run(self._failure(run_id))
            if failure is not None:
                raise failure
        raise SubmitError(
            f"Workflow {self.namespace}/{self.name} failed: "
            f"{status.get('message') or 'no message in its status'}"
        )

    async def _follow(
        self,
        timeout_s: float | None,
        on_status: Callable[[dict[str, Any]], None] | None,
    ) -> dict[str, Any]:
        from kubernetes_asyncio import client, watch

        from dagkube.kubernetes.backend import connect

        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        api = await connect(self.kube_api_url)
        custom = client.CustomObjectsApi(api)
        try:
            while True:
                # A fresh read before each watch: nothing between two watches is missed.
                status = (await _read(custom, self.namespace, self.name)).get("status") or {}
                if on_status:
                    on_status(status)
                if status.get("phase") in ENDED_PHASES:
                    return status
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise RunTimeout(
                        f"Workflow {self.namespace}/{self.name} did not finish within "
                        f"{timeout_s:g}s (phase {status.get('phase') or 'Pending'})"
                    )
                window = int(min(60.0, remaining if remaining is not None else 60.0)) + 1
                stream = watch.Watch()
                try:
                    async with asyncio.timeout(window + 5):
                        async for event in stream.stream(
                            custom.list_namespaced_custom_object,
                            GROUP,
                            VERSION,
                            self.namespace,
                            PLURAL,
                            field_selector=f"metadata.name={self.name}",
                            timeout_seconds=window,
                        ):
                            found = event.get("object") or {}
                            if (found.get("metadata") or {}).get("name") != self.name:
                                continue  # servers that ignore field selectors
                            if event.get("type") == "DELETED":
                                raise SubmitError(
                                    f"Workflow {self.namespace}/{self.name} was deleted"
                                )
                            current = found.get("status") or {}
                            if on_status:
                                on_status(current)
                            if current.get("phase") in ENDED_PHASES:
                                return current
                except TimeoutError:
                    pass
                finally:
                    stream.stop()
        finally:
            await api.close()

    async def _outputs(self, run_id: str) -> Any:
        from dagkube.runtime import launcher
        from dagkube.store.connection import BulkReader

        assert self.dag is not None and self.redis_url
        reader = BulkReader(self.redis_url)
        try:
            return await launcher.fetch_outputs(reader, self.dag, run_id)
        finally:
            reader.close()

    async def _failure(self, run_id: str) -> Exception | None:
        from redis.exceptions import RedisError

        from dagkube.runtime import launcher
        from dagkube.store.connection import connect

        assert self.redis_url
        redis = await connect(self.redis_url)
        try:
            record = await launcher.fetch_run_record(redis, run_id)
        # Its record expired (ValueError: an empty one does not validate) or Redis refused the
        # read: the SubmitError with the Workflow's status message says why the run failed.
        except (RedisError, ValueError) as exc:
            log.warning("cannot read the record of run %s (%s): reporting the status", run_id, exc)
            return None
        finally:
            await redis.aclose()
        return launcher.task_failed_from(record)


async def _read(custom: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes_asyncio import client

    try:
        return await custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
    except client.ApiException as exc:
        if exc.status == 404:
            raise SubmitError(f"Workflow {namespace}/{name} does not exist") from None
        raise SubmitError(
            f"Cannot read Workflow {namespace}/{name}: {exc.status} {exc.reason}"
        ) from None


async def create_workflow(
    body: dict[str, Any], namespace: str, kube_api_url: str | None = None
) -> dict[str, Any]:
    """Create the Workflow object; the created object (its name filled in)."""
    from kubernetes_asyncio import client

    from dagkube.kubernetes.backend import connect

    api = await connect(kube_api_url)
    try:
        return await client.CustomObjectsApi(api).create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, body
        )
    except client.ApiException as exc:
        raise SubmitError(
            f"The Kubernetes API refused the Workflow in namespace {namespace!r}: "
            f"{exc.status} {exc.reason}: {_api_message(exc)}"
        ) from None
    finally:
        await api.close()


def _api_message(exc: Any) -> str:
    import json

    try:
        return str(json.loads(exc.body).get("message", exc.body))
    except (TypeError, ValueError, AttributeError):
        return str(exc.body)


def submit(
    dag: DagSpec,
    spec: WorkflowSpec,
    *,
    namespace: str = "default",
    redis_url: str | None = None,
    kube_api_url: str | None = None,
) -> SubmittedWorkflow:
    """Store ``dag`` in Redis and create a Workflow that runs it with ``spec`` (its source
    becomes the stored DAG); returns its handle."""
    import dataclasses
    import os

    from dagkube.store.connection import connect

    require_client()
    url = redis_url or os.environ.get("DAGKUBE_REDIS_URL")
    if not url:
        raise SubmitError(
            "Submitting needs the Redis the operator uses: pass redis_url= or set "
            "DAGKUBE_REDIS_URL (e.g. after `kubectl port-forward svc/<release>-dagkube-redis "
            "6379`, redis://:<password>@127.0.0.1:6379/0)"
        )
    api_url = kube_api_url or os.environ.get("DAGKUBE_KUBE_API_URL") or None

    async def go() -> dict[str, Any]:
        redis = await connect(url)
        try:
            identifier = await store_dag(redis, dag)
        finally:
            await redis.aclose()
        body = workflow_manifest(
            dataclasses.replace(spec, source=Source(dag=identifier)),
            generate_name=name_stem(dag.name),
            namespace=namespace,
        )
        return await create_workflow(body, namespace, api_url)

    created = _run(go())
    return SubmittedWorkflow(
        created["metadata"]["name"],
        namespace,
        dag=dag,
        redis_url=url,
        kube_api_url=api_url,
    )
