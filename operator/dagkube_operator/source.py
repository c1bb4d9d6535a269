"""A Workflow's DAG from its ``spec.source``: built in a build Pod, or read from Redis.

Either way the operator reads a data-only description (:mod:`dagkube.description`) and never
unpickles anything: user code runs only in Pods of the Workflow's namespace (a build Pod, its
worker Pods), under that namespace's Redis credential.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client

from dagkube import description
from dagkube.dag import DagSpec
from dagkube.kubernetes.build import result_key
from dagkube.kubernetes.pods import BUILD_CONTAINER, build_build_pod, build_pod_name
from dagkube.kubernetes.workflow_cr import Source
from dagkube.store.keys import key_root, stored_dag
from dagkube_operator.reasons import (
    BUILD_REASONS,
    MESSAGE_LIMIT_BYTES,
    Reason,
    bounded,
    reason_of,
)
from dagkube_operator.spec import SpecError

log = logging.getLogger("dagkube.operator")

POLL_S = 0.25  # how often the build's outcome is looked for in Redis
POD_CHECK_S = 1.0  # how often the build Pod's status is read
LOG_TAIL_LINES = 40  # of a failed build's log, the last lines are read,
LOG_TAIL_BYTES = 8 * 1024  # and the last this many bytes of them go into the message
BUILD_DISK_MIB = 256  # the build Pod's /tmp and writable layers
DEADLINE_MARGIN_S = 5  # the Pod's activeDeadlineSeconds: the operator's timeout, and this
EXIT_GRACE_S = 10.0  # a build that wrote its outcome has this long to exit
GONE_TIMEOUT_S = 30.0  # an earlier build Pod of the same Workflow must be gone by then
# A Pod waiting for one of these will not start by itself: the build fails at once.
HOPELESS_WAITING = frozenset(
    {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError"}
)


@dataclass(frozen=True)
class BuildSettings:
    timeout_s: float
    memory_mib: int
    cpu: float


def build_key(namespace: str, uid: str) -> str:
    """Where the build Pod of Workflow ``uid`` stores its DAG: under its namespace's keys, the
    only ones its credential reaches."""
    return f"{key_root(namespace)}build:{uid}"


def _request(source: Source, name: str) -> dict[str, Any]:
    if source.module:
        return {"module": source.module, "args": source.args}
    return {"inline": source.inline, "name": name}


async def build_dag(
    api: client.ApiClient,
    redis: Any,
    source: Source,
    *,
    namespace: str,
    name: str,
    uid: str,
    image: str,
    redis_url_secret: tuple[str, str],
    settings: BuildSettings,
    redis_ca_secret: tuple[str, str] | None = None,
    make_room: Callable[[], Awaitable[Any]] | None = None,
) -> DagSpec:
    """Build a module or inline source in a build Pod and read what it stored; a SpecError
    carries the build's reason and message (unknown module, no workflow defined, timeout...).
    The Pod is deleted when the build ends, fails, times out or is cancelled.
    ``redis_ca_secret``: where the Pod finds a TLS Redis' CA (see build_build_pod).
    ``make_room``: called while no node has room for the Pod (idle worker Pods may hold it)."""
    core: Any = client.CoreV1Api(api)
    key = build_key(namespace, uid)
    pod_name = build_pod_name(uid)
    keys = (result_key(key), key, description.blobs_key(key), description.constants_key(key))
    await redis.delete(*keys)  # an earlier attempt's outcome is not this one's
    manifest = build_build_pod(
        name=pod_name,
        namespace=namespace,
        image=image,
        key=key,
        request=_request(source, name),
        redis_url_secret=redis_url_secret,
        memory_mib=settings.memory_mib,
        cpu_millicores=max(1, round(settings.cpu * 1000)),
        ephemeral_storage_mib=BUILD_DISK_MIB,
        deadline_s=math.ceil(settings.timeout_s) + DEADLINE_MARGIN_S,
        owner={"name": name, "uid": uid},
        redis_ca_secret=redis_ca_secret,
    )
    try:
        await _create(core, manifest)
        outcome = await _wait(
            core, redis, source, pod_name, namespace, key, settings.timeout_s, make_room
        )
        return await _read(redis, source, key, outcome)
    finally:  # also when cancelled (the Workflow deleted, the operator stopping)
        await asyncio.shield(_delete(core, pod_name, namespace))
        await redis.delete(*keys)


async def _create(core: Any, manifest: dict[str, Any]) -> None:
    meta = manifest["metadata"]
    try:
        await core.create_namespaced_pod(meta["namespace"], manifest)
        return
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    # The build Pod of an earlier attempt (a restarted operator): it goes, this one starts.
    log.info("build Pod %s/%s exists from an earlier attempt: replacing it", *_where(meta))
    await _delete(core, meta["name"], meta["namespace"])
    deadline = time.monotonic() + GONE_TIMEOUT_S
    while True:
        try:
            await core.create_namespaced_pod(meta["namespace"], manifest)
            return
        except client.ApiException as exc:
            if exc.status != 409 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(0.5)


def _where(meta: dict[str, Any]) -> tuple[str, str]:
    return meta["namespace"], meta["name"]


async def _delete(core: Any, name: str, namespace: str) -> None:
    try:
        await core.delete_namespaced_pod(name, namespace, grace_period_seconds=0)
    except client.ApiException as exc:
        if exc.status != 404:
            log.warning("cannot delete build Pod %s/%s: %s", namespace, name, exc.reason)
    except Exception as exc:  # the operator stopping: the Workflow's deletion collects it
        log.warning("cannot delete build Pod %s/%s: %s", namespace, name, exc)


async def _wait(
    core: Any,
    redis: Any,
    source: Source,
    pod_name: str,
    namespace: str,
    key: str,
    timeout_s: float,
    make_room: Callable[[], Awaitable[Any]] | None = None,
) -> bytes:
    """The build's outcome (JSON bytes) once it wrote one; a SpecError when its Pod ended
    without one, cannot start, or the time is up."""
    began = time.monotonic()
    checked = 0.0
    waiting = ""
    while True:
        found = await redis.get(result_key(key))
        if found is not None:
            # What the build stored is read once nothing of it runs any more (an atexit hook or
            # a process it left could still write its keys).
            await _until_stopped(core, pod_name, namespace)
            return bytes(found)
        now = time.monotonic()
        if now - began > timeout_s:
            stage = f" (its Pod was waiting: {waiting})" if waiting else ""
            raise SpecError(
                f"building the workflow from spec.source.{source.kind} took longer than "
                f"{timeout_s:g}s{stage}: the import or the build function does not return; "
                f"build Pod {pod_name} was deleted",
                reason=Reason.BUILD_TIMEOUT,
            )
        if now - checked >= POD_CHECK_S:
            checked = now
            pod = await _read_pod(core, pod_name, namespace)
            if pod is None:
                raise SpecError(
                    f"build Pod {pod_name} was deleted before the build ended",
                    reason=Reason.BUILD_FAILED,
                )
            phase, state = _container_state(pod)
            if phase in ("Succeeded", "Failed"):
                found = await redis.get(result_key(key))  # written just before it exited
                if found is not None:
                    return bytes(found)
                raise await _ended_without_outcome(core, source, pod_name, namespace, state)
            waiting = (state.get("waiting") or {}).get("reason") or ""
            if make_room is not None and phase == "Pending" and _unschedulable(pod):
                await make_room()
            if waiting in HOPELESS_WAITING:
                message = (state.get("waiting") or {}).get("message") or ""
                raise SpecError(
                    bounded(
                        f"build Pod {pod_name} cannot start: {waiting}"
                        + (f": {message}" if message else "")
                        + " (the build runs in the Workflow's image: spec.image or the "
                        "operator's worker image)"
                    ),
                    reason=Reason.BUILD_FAILED,
                )
        await asyncio.sleep(POLL_S)


async def _until_stopped(core: Any, name: str, namespace: str) -> None:
    """Wait until the build Pod's container has ended (it exits right after its outcome);
    one still running after EXIT_GRACE_S is deleted and waited for as long again."""
    deadline = time.monotonic() + EXIT_GRACE_S
    deleted = False
    while True:
        pod = await _read_pod(core, name, namespace)
        if pod is None or _container_state(pod)[0] in ("Succeeded", "Failed"):
            return
        if time.monotonic() > deadline:
            if deleted:
                log.warning("build Pod %s/%s is still running after its deletion", namespace, name)
                return
            log.info("build Pod %s/%s still runs after its outcome: deleting it", namespace, name)
            await _delete(core, name, namespace)
            deleted, deadline = True, time.monotonic() + EXIT_GRACE_S
        await asyncio.sleep(POLL_S)


async def _read_pod(core: Any, name: str, namespace: str) -> Any:
    try:
        return await core.read_namespaced_pod(name, namespace)
    except client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


def _unschedulable(pod: Any) -> bool:
    """Whether the scheduler found no node for the Pod (yet)."""
    conditions = (pod.status.conditions if pod.status else None) or []
    return any(
        c.type == "PodScheduled" and c.status == "False" and c.reason == "Unschedulable"
        for c in conditions
    )


def _container_state(pod: Any) -> tuple[str, dict[str, Any]]:
    """The Pod's phase and its build container's state (as a plain dict)."""
    status = pod.status
    phase = (status.phase if status else None) or "Pending"
    for container in (status.container_statuses if status else None) or []:
        state = container.state
        if container.name != BUILD_CONTAINER or state is None:
            continue
        found: dict[str, Any] = {}
        if state.waiting is not None:
            found["waiting"] = {"reason": state.waiting.reason, "message": state.waiting.message}
        if state.terminated is not None:
            found["terminated"] = {
                "exitCode": state.terminated.exit_code,
                "reason": state.terminated.reason,
            }
        return phase, found
    return phase, {}


async def _ended_without_outcome(
    core: Any, source: Source, pod_name: str, namespace: str, state: dict[str, Any]
) -> SpecError:
    terminated = state.get("terminated") or {}
    code = terminated.get("exitCode")
    why = terminated.get("reason") or ""
    if why == "OOMKilled":
        what = "was killed for using more memory than its limit (operator.buildResources)"
    elif code == 0:
        what = "exited with status 0 without writing its outcome (did the source call os._exit()?)"
    else:
        what = f"failed (exit code {code}{', ' + why if why else ''})"
    tail = ""
    try:
        text = await core.read_namespaced_pod_log(
            pod_name,
            namespace,
            container=BUILD_CONTAINER,
            tail_lines=LOG_TAIL_LINES,
            limit_bytes=8 * LOG_TAIL_BYTES,
        )
        tail = str(text)[-LOG_TAIL_BYTES:].strip()
    except Exception as exc:  # the log is a courtesy: its absence is no error
        log.debug("no log of build Pod %s/%s: %s", namespace, pod_name, exc)
    return SpecError(
        bounded(
            f"building the workflow from spec.source.{source.kind} {what}"
            + (f": {tail}" if tail else "")
        ),
        reason=Reason.BUILD_FAILED,
    )


async def _read(redis: Any, source: Source, key: str, outcome: bytes) -> DagSpec:
    """The DAG a build stored, or the failure it reported (its reason only from
    BUILD_REASONS, its message bounded)."""
    try:
        found = json.loads(outcome[: 4 * MESSAGE_LIMIT_BYTES])
    except ValueError:
        found = None
    if not isinstance(found, dict):
        raise SpecError(
            "the build's outcome is not what dagkube's build writes (did the source write to "
            "its Redis keys?)",
            reason=Reason.BUILD_FAILED,
        )
    if "reason" in found:
        reason = reason_of(found.get("reason"), Reason.BUILD_FAILED)
        raise SpecError(
            bounded(str(found.get("message", ""))),
            reason=reason if reason in BUILD_REASONS else Reason.BUILD_FAILED,
        )
    where = f"the DAG built from spec.source.{source.kind}"
    try:
        dag = await description.load(redis, key, where=where)
    except description.InvalidDescription as exc:
        raise SpecError(bounded(str(exc)), reason=Reason.BUILD_FAILED) from exc
    if dag is None:
        raise SpecError(f"{where} is missing from Redis", reason=Reason.BUILD_FAILED)
    return dag


async def load_stored_dag(redis: Any, source: Source) -> DagSpec:
    """A DAG ``Workflow.submit`` stored: its description, blobs and constants."""
    assert source.dag is not None
    key = source.redis_key or stored_dag(source.dag)
    try:
        dag = await description.load(redis, key, where=f"spec.source.ref: Redis key {key!r}")
    except description.InvalidDescription as exc:
        raise SpecError(
            bounded(f"{exc} (name the key Workflow.submit() printed, or submit again)"),
            reason=Reason.DAG_NOT_FOUND,
        ) from exc
    if dag is None:
        raise SpecError(
            f"spec.source.ref.dag={source.dag!r}: no stored DAG at Redis key {key!r} (it "
            "expires a while after it was submitted; submit the workflow again)",
            reason=Reason.DAG_NOT_FOUND,
        )
    return dag
