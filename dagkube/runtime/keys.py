"""Redis key names. Everything of a run lives under ``dk:run:<run-id>``; history under ``dk:hist``.

Per-run keys are few and fixed (outputs and dependency counts are hash fields, not keys), so a
finished run expires all of them without scanning; the only dynamic ones (per logical worker
inbox/claim) are registered in the run's ``keys`` set when created.
"""

from __future__ import annotations

from dataclasses import dataclass

HIST = "dk:hist"


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    @property
    def prefix(self) -> str:
        return f"dk:run:{self.run_id}"

    @property
    def meta(self) -> str:  # hash: status, counters, totals, provenance
        return f"{self.prefix}:meta"

    @property
    def dag(self) -> str:
        return f"{self.prefix}:dag"

    @property
    def plan(self) -> str:
        return f"{self.prefix}:plan"

    @property
    def outputs(self) -> str:  # hash task id -> serialized output
        return f"{self.prefix}:out"

    @property
    def constants(self) -> str:  # hash content key -> serialized constant
        return f"{self.prefix}:const"

    @property
    def done(self) -> str:  # set of completed task ids
        return f"{self.prefix}:done"

    @property
    def edges(self) -> str:  # set of "upstream>downstream" edges already counted
        return f"{self.prefix}:edges"

    @property
    def dep_counts(self) -> str:  # hash task id -> satisfied dependencies
        return f"{self.prefix}:depcount"

    @property
    def result(self) -> str:  # list: one element (the final status) once the run ended
        return f"{self.prefix}:result"

    def inbox(self, worker_id: str) -> str:
        return f"{self.prefix}:inbox:{worker_id}"

    def claim(self, worker_id: str) -> str:
        return f"{self.prefix}:claim:{worker_id}"

    def preload(self, host: str) -> str:  # list: inputs stored for a pre-loading host
        return f"{self.prefix}:preload:{host}"

    def duplicate(self, task_id: str) -> str:  # taskdup claim: one duplicate per task
        return f"{self.prefix}:dup:{task_id}"

    @property
    def started(self) -> str:  # hash task id -> start time, for tasks a consumer may duplicate
        return f"{self.prefix}:started"

    @property
    def keyset(self) -> str:  # set of the dynamic keys above, for expiry without scanning
        return f"{self.prefix}:keys"


@dataclass(frozen=True)
class PoolKeys:
    """Keys of one worker pool (one scaler): invocation queues and idle sets per class."""

    pool: str

    @property
    def prefix(self) -> str:
        return f"dk:pool:{self.pool}"

    def queue(self, memory_mib: int) -> str:
        return f"{self.prefix}:q:{memory_mib}"

    def idle(self, memory_mib: int) -> str:
        return f"{self.prefix}:idle:{memory_mib}"

    @property
    def classes(self) -> str:  # set of classes that ever had a queue
        return f"{self.prefix}:classes"

    @property
    def workers(self) -> str:  # hash worker id -> class, for registered workers
        return f"{self.prefix}:workers"

    @property
    def waiting(self) -> str:  # set of bound workers blocked on their inbox (no CPU used)
        return f"{self.prefix}:waiting"

    @property
    def prewarm(self) -> str:  # sorted set: pre-warm requests scored by when they are due
        return f"{self.prefix}:prewarm"

    @property
    def wake(self) -> str:  # list the scaler blocks on
        return f"{self.prefix}:wake"


def worker_proc(worker_id: str) -> str:
    """List of the work a worker holds (re-queued if the worker dies)."""
    return f"dk:w:{worker_id}:proc"


def worker_task(worker_id: str) -> str:
    """JSON {run, task, function}: the task the worker is running (read if it is lost)."""
    return f"dk:w:{worker_id}:task"


def worker_heartbeat(worker_id: str) -> str:
    return f"dk:w:{worker_id}:hb"


def hist_run(run_id: str, part: str) -> str:
    """History of one run: part is meta (hash), tasks (hash), workers (hash), plan or edges
    (JSON: task id -> its upstream task ids)."""
    return f"{HIST}:r:{run_id}:{part}"


def hist_structure_runs(structure_hash: str) -> str:
    return f"{HIST}:s:{structure_hash}:runs"


def hist_workflow_runs(name: str) -> str:
    return f"{HIST}:wf:{name}:runs"


HIST_ALL_RUNS = f"{HIST}:all"
HIST_STRUCTURES = f"{HIST}:structures"  # hash structure hash -> workflow name
HIST_USED = f"{HIST}:used"  # sorted set structure hash -> when a run of it last ended


def stored_dag(dag_id: str) -> str:
    """A DAG the SDK stored for a Kubernetes Workflow (``spec.source.ref``): its body."""
    return f"dk:dag:{dag_id}"


def stored_dag_constants(dag_key: str) -> str:
    """Hash of the large constants of the DAG stored at ``dag_key``."""
    return f"{dag_key}:const"
