"""A Workflow's run as names and times, without I/O: its run id, its worker pool, where a long
message is kept, and its deadline.

Everything here is derived from the Workflow (namespace, name, uid, ``.status.startTime`` and
``spec.timeoutSeconds``), never stored apart, so an operator that restarts finds the same run,
the same Pods and the same deadline.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from dagkube.store.keys import RunKeys, namespaced

# Worker Pods outlive their run's deadline by this much at most: the operator cancels the run
# at the deadline and deletes its Pods after a grace; the kubelet's activeDeadlineSeconds only
# stops the ones it could not (an operator that is down, a Pod it failed to delete).
WORKER_DEADLINE_MARGIN_S = 120


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
