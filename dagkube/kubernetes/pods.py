"""Pure builders of worker Pod manifests: plain dicts, no I/O, unit-tested as data.

A worker Pod runs ``python -m dagkube.worker`` for one resource class: memory request = limit =
the class, CPU request = limit = memory / ``memory_per_cpu_mib`` (capped by ``max_cpu``), the
Redis URL (with its password) from a Secret, and no service-account token, root or writable
root filesystem. Its disk is bounded (ephemeral storage request = limit, and the same size
limit on its ``/tmp`` emptyDir) and so is its life, when given (``activeDeadlineSeconds``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from dagkube.kubernetes.workflow_cr import API_VERSION, KIND
from dagkube.resources import (
    DEFAULT_MAX_CPU,
    DEFAULT_MEMORY_PER_CPU_MIB,
    cpu_for_memory,
    cpu_millicores,
    format_memory,
)
from dagkube.store.keys import local_part, namespace_of

LABEL_RUN = "dagkube.io/run"
LABEL_CLASS = "dagkube.io/class"
LABEL_COMPONENT = "dagkube.io/component"
LABEL_POOL = "dagkube.io/pool"
SHARED_RUN = "shared"  # the run label of a pool serving every run
WORKER_CONTAINER = "worker"
WORKER_UID = 10001  # matches the user of worker-image/Dockerfile
TERMINATION_GRACE_S = 10
DEFAULT_EPHEMERAL_STORAGE_MIB = 1024  # a worker's /tmp, logs and writable layer together
# Where worker and build Pods find the CA of a TLS Redis (the ``ssl_ca_certs`` of their
# rediss:// URL), mounted from their ``redis_ca_secret``; the chart mounts the operator's there.
REDIS_CA_FILE = "/etc/dagkube/redis-tls/ca.crt"

_LABEL_VALUE = re.compile(r"^(?:[A-Za-z0-9](?:[-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9](?:[-a-z0-9]{0,61}[a-z0-9])?$")


def _label_value(label: str, value: str) -> str:
    """A valid label value or a ValueError naming the label, the value and the rule."""
    if not _LABEL_VALUE.match(value):
        raise ValueError(
            f"Label {label}={value!r} is not a valid Kubernetes label value: use at most 63 "
            "letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
        )
    return value


def _name_prefix(owner_uid: str) -> str:
    stem = re.sub(r"[^a-z0-9]", "", owner_uid.lower())[:8]
    if not stem:
        raise ValueError(f"Owner uid {owner_uid!r} has no letters or digits to name Pods after")
    return f"dk-{stem}-"


def worker_pod_name(owner_uid: str, memory_mib: int, serial: int) -> str:
    """Deterministic DNS-1123 name of a worker Pod, from its owner's uid: ``dk-1a2b3c4d-512-0``.

    The same (owner, class, serial) always gives the same name, so a retried create is
    recognised as the Pod that already exists instead of making a second worker.
    """
    if memory_mib <= 0 or serial < 0:
        raise ValueError(
            f"Worker Pod needs a positive memory class and a serial >= 0, got {memory_mib} MiB "
            f"and serial {serial}"
        )
    name = f"{_name_prefix(owner_uid)}{memory_mib}-{serial}"
    if not _DNS_LABEL.match(name):
        raise ValueError(f"Worker Pod name {name!r} is not a DNS-1123 label of at most 63 chars")
    return name


def worker_pod_serial(name: str, owner_uid: str) -> int | None:
    """The serial in a name ``worker_pod_name`` made for this owner; None for other names."""
    prefix = _name_prefix(owner_uid)
    parts = name[len(prefix) :].split("-") if name.startswith(prefix) else []
    if len(parts) == 2 and all(part.isdigit() for part in parts):
        return int(parts[1])
    return None


def worker_labels(*, pool: str, run_id: str | None, memory_mib: int) -> dict[str, str]:
    """The fixed label vocabulary of a worker Pod (the pool label is what backends select on)."""
    return {
        "app.kubernetes.io/name": "dagkube",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "dagkube-operator",
        LABEL_RUN: _label_value(LABEL_RUN, local_part(run_id) if run_id else SHARED_RUN),
        LABEL_CLASS: format_memory(memory_mib),
        LABEL_COMPONENT: "worker",
        LABEL_POOL: pool_label(pool),
    }


def pool_label(pool: str) -> str:
    """The pool label of its Pods. Run ids and pool names of a namespace begin with
    ``<namespace>.`` (dagkube.store.keys); labels carry the rest, unique within the Pods'
    own namespace, so that they fit a label value's 63 characters."""
    return _label_value(LABEL_POOL, local_part(pool))


def pool_selector(pool: str) -> str:
    """Label selector of every worker Pod of a pool."""
    return f"{LABEL_POOL}={pool_label(pool)}"


def _locked_down_container() -> dict[str, Any]:
    return {
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _locked_down_pod() -> dict[str, Any]:
    """What worker and build Pods share: never restarted, no service-account token or service
    links, non-root with the image's user, the runtime's default seccomp profile."""
    return {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": TERMINATION_GRACE_S,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": WORKER_UID,
            "runAsGroup": WORKER_UID,
            "fsGroup": WORKER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }


def _mounts(
    storage: str, redis_ca_secret: tuple[str, str] | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The volumes of a worker or build Pod and its container's mounts: ``/tmp`` (an
    emptyDir of ``storage``) and, with ``redis_ca_secret`` (Secret name, key), the Redis CA
    at REDIS_CA_FILE, read-only."""
    volumes: list[dict[str, Any]] = [{"name": "tmp", "emptyDir": {"sizeLimit": storage}}]
    mounts: list[dict[str, Any]] = [{"name": "tmp", "mountPath": "/tmp"}]
    if redis_ca_secret is not None:
        secret_name, secret_key = redis_ca_secret
        directory, _, file_name = REDIS_CA_FILE.rpartition("/")
        volumes.append(
            {
                "name": "redis-ca",
                "secret": {
                    "secretName": secret_name,
                    "items": [{"key": secret_key, "path": file_name}],
                },
            }
        )
        mounts.append({"name": "redis-ca", "mountPath": directory, "readOnly": True})
    return volumes, mounts


def _guaranteed(cpu: str, memory: str, storage: str) -> dict[str, Any]:
    """Requests equal to limits (the Guaranteed QoS class): what a Pod asks is what it gets."""
    quantities = {"cpu": cpu, "memory": memory, "ephemeral-storage": storage}
    return {"requests": dict(quantities), "limits": dict(quantities)}


def _owner_reference(owner: dict[str, Any]) -> dict[str, Any]:
    """The object a Pod belongs to (garbage-collected with it): a Workflow unless ``owner``
    names another ``apiVersion`` and ``kind`` (a shared pool's ConfigMap). Only a Workflow's
    deletion waits for its Pods (``blockOwnerDeletion``)."""
    kind = owner.get("kind", KIND)
    reference = {
        "apiVersion": owner.get("apiVersion", API_VERSION),
        "kind": kind,
        "name": owner["name"],
        "uid": owner["uid"],
        "controller": True,
    }
    if kind == KIND:
        reference["blockOwnerDeletion"] = True
    return reference


def _metadata(
    name: str, namespace: str, labels: dict[str, str], owner: dict[str, Any] | None
) -> dict[str, Any]:
    """A Pod's metadata, owned by ``owner`` (garbage-collected with it) when one is given."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        metadata["ownerReferences"] = [_owner_reference(owner)]
    return metadata


def build_worker_pod(
    *,
    name: str,
    namespace: str,
    run_id: str | None,
    pool: str,
    memory_mib: int,
    image: str,
    redis_url_secret: tuple[str, str],
    idle_timeout_s: float,
    spawned_at: float,
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
    max_cpu: float = DEFAULT_MAX_CPU,
    owner: dict[str, Any] | None = None,
    labels: dict[str, str] | None = None,
    startup_delay_s: float = 0.0,
    prewarm_for: str | None = None,
    demand_for: str | None = None,
    ephemeral_storage_mib: int = DEFAULT_EPHEMERAL_STORAGE_MIB,
    active_deadline_s: int | None = None,
    redis_ca_secret: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The Pod manifest of one worker of class ``memory_mib`` serving ``pool``.

    ``redis_url_secret`` is (Secret name, key) of the full Redis URL, password included: it
    reaches the worker through a secretKeyRef, never as a literal in the manifest.
    ``spawned_at`` (epoch seconds) is when the scaler asked for the Pod: the worker measures
    its cold start from it. ``prewarm_for`` / ``demand_for``: the run the Pod is created for
    (a pre-warm request, a queued invocation), charged if the worker never serves. ``owner``
    is the Workflow or pool object the Pod belongs to (garbage-collected with it); ``run_id``
    the run its ``dagkube.io/run`` label names (None: ``shared``); ``labels`` are extra
    labels, which cannot override the fixed vocabulary. ``ephemeral_storage_mib`` bounds the
    Pod's disk (past it the kubelet evicts the Pod); ``active_deadline_s``: the kubelet stops
    the Pod this long after it started (None: no deadline). ``redis_ca_secret``: (Secret
    name, key) of the CA of a TLS Redis, mounted at REDIS_CA_FILE (the URL's ``ssl_ca_certs``).
    """
    pool_namespace = namespace_of(pool)
    if pool_namespace is not None and pool_namespace != namespace:
        # Its Redis credential (the namespace's worker user) reaches only its own namespace's
        # keys: a pool of another namespace would fail at its first command.
        raise ValueError(
            f"Worker Pod {name!r} in namespace {namespace!r} cannot serve pool {pool!r} of "
            f"namespace {pool_namespace!r}"
        )
    millicores = cpu_millicores(memory_mib, memory_per_cpu_mib, max_cpu)
    threads = max(1, math.floor(cpu_for_memory(memory_mib, memory_per_cpu_mib, max_cpu)))
    if ephemeral_storage_mib < 1 or (active_deadline_s is not None and active_deadline_s < 1):
        raise ValueError(
            f"Worker Pod {name!r} needs ephemeral storage >= 1 MiB and a deadline >= 1 s (or "
            f"none), got {ephemeral_storage_mib} MiB and {active_deadline_s!r} s"
        )
    storage = format_memory(ephemeral_storage_mib)
    volumes, mounts = _mounts(storage, redis_ca_secret)
    fixed = worker_labels(pool=pool, run_id=run_id, memory_mib=memory_mib)
    metadata = _metadata(name, namespace, {**(labels or {}), **fixed}, owner)
    container = {
        "name": WORKER_CONTAINER,
        "image": image,
        "command": [
            *("python", "-m", "dagkube.worker", "--pool", pool),
            *("--memory-mib", str(memory_mib), "--worker-id", name),
            *("--cpu", f"{millicores / 1000:g}", "--idle-timeout", f"{idle_timeout_s:g}"),
        ],
        "env": _worker_env(
            redis_url_secret, spawned_at, threads, startup_delay_s, prewarm_for, demand_for
        ),
        "resources": _guaranteed(f"{millicores}m", f"{memory_mib}Mi", storage),
        "securityContext": _locked_down_container(),
        "volumeMounts": mounts,
    }
    pod_spec: dict[str, Any] = {
        **_locked_down_pod(),
        "containers": [container],
        "volumes": volumes,
    }
    if active_deadline_s is not None:
        pod_spec["activeDeadlineSeconds"] = active_deadline_s
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def _worker_env(
    redis_url_secret: tuple[str, str],
    spawned_at: float,
    threads: int,
    startup_delay_s: float,
    prewarm_for: str | None,
    demand_for: str | None,
) -> list[dict[str, Any]]:
    """A worker's environment: the Redis URL from its Secret, when it was asked for, native
    thread pools sized to its CPU, and the run it is charged to if it never serves."""
    secret_name, secret_key = redis_url_secret
    env: list[dict[str, Any]] = [
        {
            "name": "DAGKUBE_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": secret_key}},
        },
        {"name": "DAGKUBE_SPAWNED_AT", "value": repr(float(spawned_at))},
        # Native thread pools (BLAS, OpenMP) sized to the CPU limit, not to the node's cores.
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
        {"name": "OPENBLAS_NUM_THREADS", "value": str(threads)},
        {"name": "MKL_NUM_THREADS", "value": str(threads)},
        # The root filesystem is read-only: temporary files and caches go to the emptyDir.
        {"name": "TMPDIR", "value": "/tmp"},
        {"name": "HOME", "value": "/tmp"},
    ]
    if startup_delay_s > 0:
        env.append({"name": "DAGKUBE_STARTUP_DELAY_S", "value": str(startup_delay_s)})
    if prewarm_for:
        env.append({"name": "DAGKUBE_PREWARM_RUN", "value": prewarm_for})
    elif demand_for:
        env.append({"name": "DAGKUBE_DEMAND_RUN", "value": demand_for})
    return env


WORKER_REDIS_SECRET = "dagkube-worker-redis"  # one per namespace: its worker user's Redis URL
WORKER_REDIS_SECRET_KEY = "url"
WORKER_REDIS_CA_KEY = "ca.crt"  # a TLS Redis' CA (PEM), for the Pods' ``redis_ca_secret``


def build_worker_redis_secret(
    namespace: str, url: str, ca_pem: str | None = None
) -> dict[str, Any]:
    """The Secret holding the Redis URL of ``namespace``'s worker user (``acl.worker_user``,
    password included), for its worker Pods' ``redis_url_secret``: (WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY), and with ``ca_pem`` the CA of a TLS Redis under
    WORKER_REDIS_CA_KEY. The operator creates it with the user."""
    data = {WORKER_REDIS_SECRET_KEY: url}
    if ca_pem is not None:
        data[WORKER_REDIS_CA_KEY] = ca_pem
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": WORKER_REDIS_SECRET,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "dagkube",
                "app.kubernetes.io/component": "worker-credentials",
                "app.kubernetes.io/managed-by": "dagkube-operator",
            },
        },
        "stringData": data,
    }


def build_pool_object(
    *, name: str, namespace: str, pool: str, settings: dict[str, Any]
) -> dict[str, Any]:
    """The ConfigMap standing for a shared worker pool: its Pods are owned by it (deleting it,
    or its namespace, garbage-collects them) and named from its uid; ``settings`` (what shapes
    the pool's Pods) are kept in it for the reader."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "dagkube",
                "app.kubernetes.io/component": "worker-pool",
                "app.kubernetes.io/managed-by": "dagkube-operator",
                LABEL_POOL: pool_label(pool),
            },
        },
        "data": {"pool": pool, "settings.json": json.dumps(settings, sort_keys=True)},
    }


BUILD_CONTAINER = "build"
BUILD_REQUEST_ENV = "DAGKUBE_BUILD_REQUEST"  # dagkube.kubernetes.build.REQUEST_ENV


def build_pod_name(owner_uid: str) -> str:
    """The one build Pod of a Workflow: ``dk-1a2b3c4d-build`` (a retried create finds it)."""
    return f"{_name_prefix(owner_uid)}build"


def build_build_pod(
    *,
    name: str,
    namespace: str,
    image: str,
    key: str,
    request: dict[str, Any],
    redis_url_secret: tuple[str, str],
    memory_mib: int,
    cpu_millicores: int,
    ephemeral_storage_mib: int,
    deadline_s: int,
    owner: dict[str, Any] | None = None,
    redis_ca_secret: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """The Pod that builds a Workflow's DAG from its inline or module source (user code):
    ``python -m dagkube.kubernetes.build`` in the Workflow's image and namespace, locked down
    as a worker is (no token, non-root, read-only root, no privilege), with memory, CPU and
    disk limits and ``activeDeadlineSeconds``. ``request`` (the source) travels in an
    environment variable; the DAG comes back through Redis at ``key`` (the namespace's worker
    credential, from ``redis_url_secret``; a TLS Redis' CA from ``redis_ca_secret``, as for
    :func:`build_worker_pod`)."""
    if memory_mib < 1 or cpu_millicores < 1 or ephemeral_storage_mib < 1 or deadline_s < 1:
        raise ValueError(
            f"Build Pod {name!r} needs memory >= 1 MiB, CPU >= 1m, disk >= 1 MiB and a deadline "
            f">= 1 s, got {memory_mib} MiB, {cpu_millicores}m, {ephemeral_storage_mib} MiB, "
            f"{deadline_s} s"
        )
    secret_name, secret_key = redis_url_secret
    storage = format_memory(ephemeral_storage_mib)
    volumes, mounts = _mounts(storage, redis_ca_secret)
    resources = _guaranteed(f"{cpu_millicores}m", f"{memory_mib}Mi", storage)
    labels = {
        "app.kubernetes.io/name": "dagkube",
        "app.kubernetes.io/component": "build",
        "app.kubernetes.io/managed-by": "dagkube-operator",
        LABEL_COMPONENT: "build",
    }
    metadata = _metadata(name, namespace, labels, owner)
    pod_spec: dict[str, Any] = {
        **_locked_down_pod(),
        "terminationGracePeriodSeconds": 0,  # nothing to save: a stopped build is killed
        "activeDeadlineSeconds": deadline_s,
        "containers": [
            {
                "name": BUILD_CONTAINER,
                "image": image,
                "command": ["python", "-m", "dagkube.kubernetes.build", "--key", key],
                "env": [
                    {
                        "name": "DAGKUBE_REDIS_URL",
                        "valueFrom": {"secretKeyRef": {"name": secret_name, "key": secret_key}},
                    },
                    {"name": BUILD_REQUEST_ENV, "value": json.dumps(request)},
                    {"name": "TMPDIR", "value": "/tmp"},
                    {"name": "HOME", "value": "/tmp"},
                    {"name": "PYTHONUNBUFFERED", "value": "1"},
                ],
                "resources": resources,
                "securityContext": _locked_down_container(),
                "volumeMounts": mounts,
            }
        ],
        "volumes": volumes,
    }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}
