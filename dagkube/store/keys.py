"""Redis key names. Everything of a run lives under ``<root>run:<run-id>``; history under
``<root>hist``.

Per-run keys are few and fixed (small outputs and dependency counts are hash fields, not keys),
so a finished run expires all of them without scanning; the dynamic ones (per logical worker
inbox/claim, a large output's own key) are registered in the run's ``keys`` set when created.

**Namespaces** (docs/architecture.md, "Key space and Redis users"): a run id or pool name of
the form ``<namespace>.<rest>`` belongs to that Kubernetes namespace, and every key derived
from it lives under ``dk:ns:<namespace>:``; the history its runs write too, and the keys of the
workers serving its pool. One ACL key pattern, ``~dk:ns:<namespace>:*``, then names all a
namespace's worker may touch. Ids without a '.' (local runs) keep the root ``dk:``. A
namespace name (a DNS-1123 label) has no '.', ':' or glob character, so the first '.' ends
it and the pattern matches no other namespace's keys.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

NAMESPACE_SEPARATOR = "."
_NAMESPACE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def check_namespace(namespace: str) -> str:
    """A Kubernetes namespace name (DNS-1123 label), else ValueError: it becomes part of key
    names and of an ACL key pattern, where '.', ':' or a glob character would widen it."""
    if not _NAMESPACE.match(namespace):
        raise ValueError(
            f"Namespace {namespace!r} is not a valid Kubernetes namespace name: use at most 63 "
            "lowercase letters, digits or '-', starting and ending with a letter or digit"
        )
    return namespace


def namespaced(namespace: str, local_id: str) -> str:
    """The id (run id, pool name) of ``local_id`` in a namespace: ``<namespace>.<local_id>``."""
    if not local_id:
        raise ValueError(f"An id in namespace {namespace!r} needs a non-empty local part")
    return f"{check_namespace(namespace)}{NAMESPACE_SEPARATOR}{local_id}"


def namespace_of(scoped_id: str) -> str | None:
    """The namespace a run id or pool name belongs to (the part before its first '.'), None
    for an id without one."""
    head, separator, _ = scoped_id.partition(NAMESPACE_SEPARATOR)
    return head if separator and head else None


def local_part(scoped_id: str) -> str:
    """The id without its namespace (as it is unique within the namespace: Pod labels)."""
    return scoped_id.partition(NAMESPACE_SEPARATOR)[2] if namespace_of(scoped_id) else scoped_id


def key_root(namespace: str | None) -> str:
    """Where the keys of a namespace begin: ``dk:ns:<namespace>:``; ``dk:`` without one."""
    return "dk:" if namespace is None else f"dk:ns:{check_namespace(namespace)}:"


def namespace_pattern(namespace: str) -> str:
    """The ACL key pattern of every key of a namespace's runs, pools, workers and history."""
    return f"{key_root(namespace)}*"


@dataclass(frozen=True, slots=True)
class KeySpace:
    """The prefixes of one namespace's keys (None: local runs). Every key builder below starts
    from these, and the Lua scripts get them as their first arguments (:meth:`script_args`)
    and append ids and part names: a key is spelled in one place, and every key a script
    touches for a run of namespace N lies under ``dk:ns:N:``."""

    namespace: str | None = None

    @classmethod
    def of(cls, scoped_id: str) -> KeySpace:
        """The key space of a run id or pool name (its namespace's, :func:`namespace_of`)."""
        return cls(namespace_of(scoped_id))

    @property
    def root(self) -> str:
        return key_root(self.namespace)

    @property
    def runs(self) -> str:  # + run id: RunKeys.prefix
        return f"{self.root}run:"

    @property
    def pools(self) -> str:  # + pool name: PoolKeys.prefix
        return f"{self.root}pool:"

    @property
    def workers(self) -> str:  # + worker id + ":" + part
        return f"{self.root}w:"

    @property
    def history(self) -> str:  # + index name: the history's indexes
        return f"{hist_root(self.namespace)}:"

    @property
    def history_runs(self) -> str:  # + run id + ":" + part: hist_run
        return f"{self.history}r:"

    def script_args(self) -> list[str]:
        """The first four arguments of every script (lua/prelude.lua reads them there)."""
        return [self.runs, self.history, self.history_runs, self.pools]


# The keys every run has (RunKeys' properties below, as parts after its prefix); the dynamic
# ones (inboxes, claims, preloads, duplicates) are listed in its ``keys`` set. The scripts
# expire these at the run's end (scripts.py hands them this list).
RUN_PARTS = (
    "meta",
    "dag",
    "plan",
    "out",
    "const",
    "done",
    "depcount",
    "started",
    "keys",
    "result",
)


def own_key(hash_key: str, field: str) -> str:
    """Where the value of a hash's field lives when it is too large for the hash: a string key
    of its own, the hash's name and the field (a run's large outputs, :meth:`RunKeys.output`).
    Redis keeps a received string as it is, where a hash field is copied in (milliseconds for
    a 16 MiB value, holding up every client). Readers look here for a field the hash lacks
    (:class:`dagkube.store.connection.BulkReader`, lua/lengths.lua)."""
    return f"{hash_key}:{field}"


@dataclass(frozen=True)
class RunKeys:
    run_id: str

    @property
    def fixed(self) -> tuple[str, ...]:
        """Every key of the run but the dynamic ones its ``keyset`` lists."""
        return tuple(f"{self.prefix}:{part}" for part in RUN_PARTS)

    @property
    def prefix(self) -> str:
        return f"{KeySpace.of(self.run_id).runs}{self.run_id}"

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
    def outputs(self) -> str:  # hash task id -> serialized output (small ones)
        return f"{self.prefix}:out"

    def output(self, task_id: str) -> str:  # string: a large output (see own_key)
        return own_key(self.outputs, task_id)

    @property
    def constants(self) -> str:  # hash content key -> serialized constant
        return f"{self.prefix}:const"

    @property
    def done(self) -> str:  # set of completed task ids
        return f"{self.prefix}:done"

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

    def offers(self, worker_id: str) -> str:  # list: ready tasks others may take (stealing)
        return f"{self.prefix}:offers:{worker_id}"

    def taken(self, worker_id: str) -> str:  # set: of those, taken, until the worker is told
        return f"{self.prefix}:taken:{worker_id}"

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
    """Keys of one worker pool (one scaler): invocation queues and idle sets per class. A pool
    serves runs of its own namespace only (its name's, see :func:`namespace_of`)."""

    pool: str

    @property
    def prefix(self) -> str:
        return f"{KeySpace.of(self.pool).pools}{self.pool}"

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


def _worker_key(worker_id: str, pool: str, part: str) -> str:
    # A worker's keys share its pool's namespace: worker ids are Pod names, unique per
    # namespace only, and carry none.
    return f"{KeySpace.of(pool).workers}{worker_id}:{part}"


def worker_proc(worker_id: str, pool: str = "") -> str:
    """List of the work a worker of ``pool`` holds (re-queued if the worker dies)."""
    return _worker_key(worker_id, pool, "proc")


def worker_task(worker_id: str, pool: str = "") -> str:
    """JSON {run, task, function}: the task the worker is running (read if it is lost)."""
    return _worker_key(worker_id, pool, "task")


def worker_heartbeat(worker_id: str, pool: str = "") -> str:
    return _worker_key(worker_id, pool, "hb")


def hist_root(namespace: str | None = None) -> str:
    """Where a namespace's history begins (``dk:hist`` without a namespace)."""
    return f"{key_root(namespace)}hist"


def hist_run(run_id: str, part: str) -> str:
    """History of one run: part is meta (hash), tasks (hash), workers (hash), plan or edges
    (JSON: task id -> its upstream task ids). In its run's namespace."""
    return f"{KeySpace.of(run_id).history_runs}{run_id}:{part}"


def hist_structure_runs(structure_hash: str, namespace: str | None = None) -> str:
    return f"{hist_root(namespace)}:s:{structure_hash}:runs"


def hist_workflow_runs(name: str, namespace: str | None = None) -> str:
    return f"{hist_root(namespace)}:wf:{name}:runs"


def hist_all_runs(namespace: str | None = None) -> str:
    return f"{hist_root(namespace)}:all"


def hist_structures(namespace: str | None = None) -> str:
    """Hash structure hash -> workflow name."""
    return f"{hist_root(namespace)}:structures"


def hist_used(namespace: str | None = None) -> str:
    """Sorted set structure hash -> when a run of it last ended."""
    return f"{hist_root(namespace)}:used"


HIST_ALL_RUNS = hist_all_runs()
HIST_STRUCTURES = hist_structures()
HIST_USED = hist_used()


def stored_dag(dag_id: str) -> str:
    """A DAG the SDK stored for a Kubernetes Workflow (``spec.source.ref``): its body. Read by
    the operator only (workers get the run's copy)."""
    return f"dk:dag:{dag_id}"


# Set of the namespaces whose Workflows ran (the operator adds each when it first serves it):
# whose histories /metrics folds. The operator's own key, outside every namespace's prefix.
NAMESPACES = "dk:namespaces"
