"""What planners learn from: a plain-data snapshot of earlier runs of one workflow structure.

Planners never read Redis; :func:`dagkube.metrics.history.load_snapshot` builds this from the
run history and the planner receives it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dagkube.planning.model import AUTO


@dataclass(frozen=True, slots=True)
class TaskSample:
    """One task execution as it was measured."""

    function: str
    memory_mib: int
    input_bytes: int
    output_bytes: int
    exec_s: float
    task_id: str = ""  # stable within a structure: argument-dependent durations show here
    download_bytes: int = 0
    download_s: float = 0.0
    upload_bytes: int = 0
    upload_s: float = 0.0
    peak_memory_bytes: int = 0  # the worker's peak while it ran (0: not measured)
    oom_mib: int = 0  # the largest class an earlier attempt was OOM-killed at (0: none)
    cpu_s: float = 0.0  # CPU time of the thread that ran it (0: not measured)
    run_id: str = ""  # with started_at: which tasks of a run computed at the same time
    started_at: float = 0.0  # execution start, Unix seconds
    worker_id: str = ""  # the process that ran it (one task at a time)


@dataclass(frozen=True, slots=True)
class StartupSample:
    """One worker start, queueing excluded: spawn -> first task (cold) or taking the
    invocation -> first task (warm). Waiting for a free worker is the timing model's part.
    ``prewarmed``: spawn -> ready of a pre-warmed worker, which starts with the others of its
    request (locally they share the cores: slower than a start alone)."""

    memory_mib: int
    cold: bool
    startup_s: float
    prewarmed: bool = False


@dataclass(frozen=True, slots=True)
class OverheadSample:
    """Time a worker of ``memory_mib`` spent on a task besides what the timing model times
    as execution, download and upload. ``kind``: "pre", a task's ready to execution start
    less its download (claiming it, gathering its inputs, the hop to the task thread);
    "post", from one task's completion call returning to the next task of the same
    invocation being ready (the hop back from the task thread, its record, the worker
    core); "handover", the same across an invocation's end and the next invocation the
    worker took from its queue (``FINISH``, which hands it over, and taking it). ``bound``:
    the task ran on a bound (planned logical) worker, which differs: its next task's claim
    rides on the completion, and its inbox hands over many tasks at once."""

    memory_mib: int
    kind: str
    seconds: float
    bound: bool = False


@dataclass(frozen=True, slots=True)
class DuplicateSample:
    """One taskdup duplicate as it turned out: what the consumer that ran it gained, the
    original's end less the duplicate's (negative: the original ended first, and the
    consumer was busy with the duplicate that long after its input existed)."""

    function: str  # the duplicated upstream's
    task_id: str
    saved_s: float


@dataclass(frozen=True, slots=True)
class Residual:
    """One earlier run's actual makespan minus the timing model's prediction for it."""

    planner: str  # see calibration_key
    sla: str  # the SLA the run was planned at: a pNN model already holds the spread
    seconds: float
    model_s: float | None = None  # the timing model's makespan it is measured against

    @property
    def ratio(self) -> float | None:
        """Actual over modelled makespan (None without a model makespan)."""
        return (self.model_s + self.seconds) / self.model_s if self.model_s else None


def calibration_key(planner: str, chosen: str | None) -> str:
    """The planner a run's makespan residual is kept under: an ``auto`` run's under the
    planner of the candidate it chose (``chosen``: "wukong", "uniform" or "non-uniform"), as
    its timing model's miss is that plan's; any other run's under its own name. Without a
    known choice (runs recorded before the candidates were stored): "auto"."""
    return chosen if planner == AUTO and chosen else planner


@dataclass
class HistorySnapshot:
    """Samples from the last runs of one structure hash (most recent runs first)."""

    structure_hash: str = ""
    runs: int = 0
    tasks: list[TaskSample] = field(default_factory=list)
    startups: list[StartupSample] = field(default_factory=list)
    residuals: list[Residual] = field(default_factory=list)
    overheads: list[OverheadSample] = field(default_factory=list)
    duplicates: list[DuplicateSample] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.tasks
