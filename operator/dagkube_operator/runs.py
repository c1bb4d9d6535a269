"""A Workflow's run as names and times, without I/O: its run id, its worker pool, where a long
message is kept, and its deadline.

Everything here is derived from the Workflow (namespace, name, uid, ``.status.startTime`` and
its spec), never stored apart, so an operator that restarts finds the same run, the same pool
and the same deadline.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from dagkube.store.keys import RunKeys, local_part, namespaced

POOL_PREFIX = "wp-"  # the local part of a shared pool's id: wp-<hash of its PoolSettings>
POOL_HASH_CHARS = 10


def run_id_for(namespace: str, name: str, uid: str) -> str:
    """The run id of a Workflow: stable across operator restarts, ``<namespace>.<rest>`` so
    that its keys live under its namespace's prefix (the one its workers' Redis user may
    touch), the rest a valid label value without a '.'."""
    stem = name[:40].replace(".", "-").rstrip("-")
    return namespaced(namespace, f"{stem}-{uid.replace('-', '')[:8]}")


@dataclass(frozen=True)
class PoolSettings:
    """Everything that shapes a worker Pod. Workflows of a namespace with equal settings share
    one pool: a worker Pod that one of them left idle serves the next as a warm start. Per-run
    settings (timeouts, classes, maxWorkers, planner) are not here: they do not change a Pod."""

    image: str
    memory_per_cpu_mib: int
    max_cpu: float
    idle_timeout_s: float
    startup_delay_s: float
    ephemeral_storage_mib: int

    @property
    def digest(self) -> str:
        """A short, stable hash of the settings (the same settings, the same hash: numbers
        are compared as numbers, 6 and 6.0 alike)."""
        values = {
            name: float(value) if isinstance(value, int | float) else value
            for name, value in asdict(self).items()
        }
        canonical = json.dumps(values, sort_keys=True)
        return hashlib.sha256(canonical.encode()).hexdigest()[:POOL_HASH_CHARS]


def pool_for(namespace: str, settings: PoolSettings) -> str:
    """The worker pool of a Workflow: ``<namespace>.wp-<hash of its Pod settings>``, shared by
    every Workflow of the namespace whose worker Pods would be the same."""
    return namespaced(namespace, f"{POOL_PREFIX}{settings.digest}")


def pool_object_name(pool: str) -> str:
    """The ConfigMap that owns a shared pool's Pods (deleting it garbage-collects them)."""
    return f"dagkube-worker-pool-{local_part(pool)}"


def message_key(run_id: str) -> str:
    """Where the whole of a message too long for ``.status`` is kept (the run's TTL)."""
    return f"{RunKeys(run_id).prefix}:message"


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
