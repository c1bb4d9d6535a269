"""Runtime rules written once: where a ready downstream task runs, what a worker runs next,
the order a run's first invocations may be queued in, and from when a worker's time is
charged to a run.

The worker's core (``dagkube.runtime.workercore``) and the timing model
(:mod:`dagkube.planning.timing`) both call these functions, so the prediction simulates the
rules the runtime follows. Two places outside Python spell the same rules and must follow
this module: the COMPLETE Lua script (routing) and the scaler's REQUEUE script (a lost
worker is charged from the later of its spawn and its invocation's queueing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dagkube.dag import DagSpec


class Route(StrEnum):
    """Where a downstream task goes once its last input is complete."""

    CONTINUE = "continue"  # the producer's flexible worker runs it next (its continuation)
    LOCAL = "local"  # the producer's worker runs it later (a clustered child, or its own task)
    QUEUE = "queue"  # a new flexible invocation of its class
    INBOX = "inbox"  # the inbox of its bound worker (whose invocation is queued once per run)


def route(
    *,
    producer_worker: str | None,
    consumer_worker: str | None,
    clustered: bool,
    continuation_taken: bool,
) -> Route:
    """The route of a ready consumer: ``producer_worker``/``consumer_worker`` are the planned
    logical workers (None: flexible), ``clustered`` whether the producer clusters its
    children, ``continuation_taken`` whether an earlier consumer of this completion is
    already the producer's continuation (consumers are routed in DAG order)."""
    if consumer_worker is None:
        if producer_worker is None and not continuation_taken:
            return Route.CONTINUE
        if producer_worker is None and clustered:
            return Route.LOCAL
        return Route.QUEUE
    if consumer_worker == producer_worker:
        return Route.LOCAL
    return Route.INBOX


def flexible_next(
    continuation: str | None, local: Iterable[str], pending: Iterable[str]
) -> list[str]:
    """A flexible worker's tasks still to run after a completion, in order: its continuation,
    the consumers routed to it locally (in DAG order), then what was pending before (depth
    first: a clustered child's own continuation runs before its siblings)."""
    return ([continuation] if continuation else []) + list(local) + list(pending)


# A bound worker overlaps a task's COMPLETE step (and upload) with its next ready task only for
# an output of at most this share of the task's memory (its serialized copy is held meanwhile).
OVERLAP_OUTPUT_SHARE = 16


def overlaps_step(output_bytes: int, memory_mib: int) -> bool:
    """Whether a bound worker with its next task ready starts it while the COMPLETE step of
    the task it executed (an output of ``output_bytes``, uploaded if stored) is under way,
    rather than after the step's reply."""
    return output_bytes * OVERLAP_OUTPUT_SHARE <= memory_mib * 1024 * 1024


@dataclass(frozen=True)
class StartCharge:
    """How a worker's start on an invocation is counted."""

    cold: bool  # a cold start: the worker was spawned for this demand
    charged_from_s: float  # the run pays the worker's time from here
    spawned_s: float | None  # the spawn time, when the charge starts there (else None)


def start_charge(
    *,
    first: bool,
    spawned_s: float | None,
    queued_s: float | None,
    prewarmed: bool,
    taken_s: float,
) -> StartCharge:
    """A worker's first invocation is a cold start unless the worker was spawned before the
    invocation was queued (it sat idle since an earlier spawn: ready before the demand). A
    cold or pre-warmed start is charged from the spawn (a pre-warmed worker's wait for its
    run's demand is the run's cost); any other from the time the invocation is taken.
    ``queued_s`` None or 0 is unknown: the first start then counts as cold."""
    cold = first and not (spawned_s is not None and queued_s and spawned_s < queued_s)
    charged = charged_from(cold=cold, prewarmed=prewarmed, spawned_s=spawned_s, taken_s=taken_s)
    return StartCharge(
        cold=cold,
        charged_from_s=charged,
        spawned_s=spawned_s if spawned_s is not None and charged == spawned_s else None,
    )


def charged_from(*, cold: bool, prewarmed: bool, spawned_s: float | None, taken_s: float) -> float:
    """From when a run pays for a worker's start: its spawn for a cold or pre-warmed start
    (when the spawn time is known), else the time it took the invocation. The exporter reads
    worker records with the same rule."""
    if spawned_s is not None and (cold or prewarmed):
        return spawned_s
    return taken_s


def source_order(dag: DagSpec, exec_s: Mapping[str, float]) -> list[str]:
    """The sources, the longest predicted path to the workflow's end first (the source's
    own execution included; ties in the DAG's order): list scheduling by the critical path.
    A plan with ``longest_first`` queues its first invocations so, and a bound worker runs
    its sources so (the launcher reads the plan's predicted execution times); otherwise they
    go in the DAG's order."""
    below: dict[str, float] = {}
    for task_id in reversed(dag.tasks):
        spec = dag.tasks[task_id]
        below[task_id] = exec_s[task_id] + max((below[d] for d in spec.downstream), default=0.0)
    return sorted(dag.sources, key=lambda t: -below[t])
