"""Pure builders of worker Pod manifests: plain dicts, no I/O, unit-tested as data.

A worker Pod runs ``python -m dagkube.worker`` for one resource class: memory request = limit =
the class, CPU request = limit = memory / ``memory_per_cpu_mib`` (capped by ``max_cpu``), the
Redis URL (with its password) from a Secret, and no service-account token, root or writable
root filesystem. Its disk is bounded (ephemeral storage request = limit, and the same size
limit on its ``/tmp`` emptyDir) and so is its life, when given (``activeDeadlineSeconds``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from dagkube.resources import (
    DEFAULT_MAX_CPU,
    DEFAULT_MEMORY_PER_CPU_MIB,
    cpu_for_memory,
    cpu_millicores,
    format_memory,
)
from dagkube.runtime.keys import local_part, namespace_of

LABEL_RUN = "dagkube.io/run"
LABEL_CLASS = "dagkube.io/class"
LABEL_COMPONENT = "dagkube.io/component"
LABEL_POOL = "dagkube.io/pool"
SHARED_RUN = "shared"  # the run label of a pool serving every run
WORKER_CONTAINER = "worker"
WORKER_UID = 10001  # matches the user of worker-image/Dockerfile
TERMINATION_GRACE_S = 10
DEFAULT_EPHEMERAL_STORAGE_MIB = 1024  # a worker's /tmp, logs and writable layer together

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
    ``<namespace>.`` (dagkube.runtime.keys); labels carry the rest, unique within the Pods'
    own namespace, so that they fit a label value's 63 characters."""
    return _label_value(LABEL_POOL, local_part(pool))


def pool_selector(pool: str) -> str:
    """Label selector of every worker Pod of a pool."""
    return f"{LABEL_POOL}={pool_label(pool)}"


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
) -> dict[str, Any]:
    """The Pod manifest of one worker of class ``memory_mib`` serving ``pool``.

    ``redis_url_secret`` is (Secret name, key) of the full Redis URL, password included: it
    reaches the worker through a secretKeyRef, never as a literal in the manifest.
    ``spawned_at`` (epoch seconds) is when the scaler asked for the Pod: the worker measures
    its cold start from it. ``prewarm_for`` / ``demand_for``: the run the Pod is created for
    (a pre-warm request, a queued invocation), charged if the worker never serves. ``owner``
    is the Workflow the Pod belongs to (garbage-collected with it); ``labels`` are extra
    labels, which cannot override the fixed vocabulary. ``ephemeral_storage_mib`` bounds the
    Pod's disk (past it the kubelet evicts the Pod); ``active_deadline_s``: the kubelet stops
    the Pod this long after it started (None: no deadline).
    """
    pool_namespace = namespace_of(pool)
    if pool_namespace is not None and pool_namespace != namespace:
        # Its Redis credential (the namespace's worker user) reaches only its own namespace's
        # keys: a pool of another namespace would fail at its first command.
        raise ValueError(
            f"Worker Pod {name!r} in namespace {namespace!r} cannot serve pool {pool!r} of "
            f"namespace {pool_namespace!r}"
        )
    secret_name, secret_key = redis_url_secret
    millicores = cpu_millicores(memory_mib, memory_per_cpu_mib, max_cpu)
    threads = str(max(1, math.floor(cpu_for_memory(memory_mib, memory_per_cpu_mib, max_cpu))))
    if ephemeral_storage_mib < 1 or (active_deadline_s is not None and active_deadline_s < 1):
        raise ValueError(
            f"Worker Pod {name!r} needs ephemeral storage >= 1 MiB and a deadline >= 1 s (or "
            f"none), got {ephemeral_storage_mib} MiB and {active_deadline_s!r} s"
        )
    storage = format_memory(ephemeral_storage_mib)
    quantities = {
        "cpu": f"{millicores}m",
        "memory": f"{memory_mib}Mi",
        "ephemeral-storage": storage,
    }
    env: list[dict[str, Any]] = [
        {
            "name": "DAGKUBE_REDIS_URL",
            "valueFrom": {"secretKeyRef": {"name": secret_name, "key": secret_key}},
        },
        {"name": "DAGKUBE_SPAWNED_AT", "value": repr(float(spawned_at))},
        # Native thread pools (BLAS, OpenMP) sized to the CPU limit, not to the node's cores.
        {"name": "OMP_NUM_THREADS", "value": threads},
        {"name": "OPENBLAS_NUM_THREADS", "value": threads},
        {"name": "MKL_NUM_THREADS", "value": threads},
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
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "labels": {
            **(labels or {}),
            **worker_labels(pool=pool, run_id=run_id, memory_mib=memory_mib),
        },
    }
    if owner is not None:
        metadata["ownerReferences"] = [
            {
                "apiVersion": "dagkube.io/v1alpha1",
                "kind": "Workflow",
                "name": owner["name"],
                "uid": owner["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
    pod_spec: dict[str, Any] = {
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
        "containers": [
            {
                "name": WORKER_CONTAINER,
                "image": image,
                "command": [
                    "python",
                    "-m",
                    "dagkube.worker",
                    "--pool",
                    pool,
                    "--memory-mib",
                    str(memory_mib),
                    "--worker-id",
                    name,
                    "--cpu",
                    f"{millicores / 1000:g}",
                    "--idle-timeout",
                    f"{idle_timeout_s:g}",
                ],
                "env": env,
                "resources": {"requests": dict(quantities), "limits": dict(quantities)},
                "securityContext": {
                    "readOnlyRootFilesystem": True,
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
            }
        ],
        "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": storage}}],
    }
    if active_deadline_s is not None:
        pod_spec["activeDeadlineSeconds"] = active_deadline_s
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


WORKER_REDIS_SECRET = "dagkube-worker-redis"  # one per namespace: its worker user's Redis URL
WORKER_REDIS_SECRET_KEY = "url"


def build_worker_redis_secret(namespace: str, url: str) -> dict[str, Any]:
    """The Secret holding the Redis URL of ``namespace``'s worker user (``acl.worker_user``,
    password included), for its worker Pods' ``redis_url_secret``: (WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY). The operator creates it with the user."""
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
        "stringData": {WORKER_REDIS_SECRET_KEY: url},
    }
