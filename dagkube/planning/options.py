"""What a planner may use besides the DAG: classes, SLA, history, limits, optimizations."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from dagkube.planning.history import HistorySnapshot
from dagkube.planning.objective import Goal, check_max_gb_s, check_objective
from dagkube.planning.optimizations import check_optimizations
from dagkube.planning.predictions import Predictor
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB, parse_classes

DEFAULT_CLUSTER_SIZE = 4
DEFAULT_IDLE_TIMEOUT_S = 30.0  # how long an idle worker waits for work before it exits


@dataclass
class PlanningOptions:
    """Everything a planner may use besides the DAG."""

    classes_mib: list[int]
    sla: str = "avg"
    history: HistorySnapshot = field(default_factory=HistorySnapshot)
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB
    max_cpu: float = DEFAULT_MAX_CPU
    max_workers: int | None = None  # local worker cap; None on Kubernetes
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    warm_pool: dict[int, int] = field(default_factory=dict)  # idle workers per class now
    startup_delay_s: float = 0.0
    cluster_size: int = DEFAULT_CLUSTER_SIZE
    cpu_enforced: bool = True  # False for local workers, which share the machine's cores
    optimizations: list[str] = field(default_factory=list)  # in OPTIMIZATIONS order
    label: str | None = None  # the planner's name as asked for, e.g. "uniform-opt"
    objective: str = "makespan"  # what choices between plans optimize (planning.objective)
    max_gb_s: float | None = None  # a GB-s budget the chosen plan should fit

    @classmethod
    def for_run(
        cls,
        classes: str | Iterable[str | int] | None = None,
        *,
        sla: str = "avg",
        history: HistorySnapshot | None = None,
        memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB,
        max_cpu: float = DEFAULT_MAX_CPU,
        max_workers: int | None = None,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
        startup_delay_s: float = 0.0,
        cpu_enforced: bool = True,
        optimizations: Iterable[str] | str | None = None,
        warm_pool: dict[int, int] | None = None,
        cluster_size: int = DEFAULT_CLUSTER_SIZE,
        objective: str = "makespan",
        max_gb_s: float | None = None,
    ) -> PlanningOptions:
        """The options of one planning call, as every caller (library, runtime, command line,
        operator) builds them: ``classes`` parsed (None: the default classes),
        ``optimizations`` checked and put in composition order, no history or warm pool unless
        given. Callers pass only what their setting decides; the defaults live here."""
        return cls(
            classes_mib=parse_classes(classes),
            sla=sla,
            history=history if history is not None else HistorySnapshot(),
            memory_per_cpu_mib=memory_per_cpu_mib,
            max_cpu=max_cpu,
            max_workers=max_workers,
            idle_timeout_s=idle_timeout_s,
            warm_pool=dict(warm_pool or {}),
            startup_delay_s=startup_delay_s,
            cluster_size=cluster_size,
            cpu_enforced=cpu_enforced,
            optimizations=check_optimizations(optimizations),
            objective=check_objective(objective),
            max_gb_s=check_max_gb_s(max_gb_s),
        )

    def goal(self) -> Goal:
        """The objective and budget choices between candidate plans are made by."""
        return Goal(self.objective, self.max_gb_s)

    def predictor(self) -> Predictor:
        return Predictor(
            self.history,
            self.sla,
            self.memory_per_cpu_mib,
            self.max_cpu,
            startup_delay_s=self.startup_delay_s,
            cpu_enforced=self.cpu_enforced,
        )
