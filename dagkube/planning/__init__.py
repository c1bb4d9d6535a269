"""Planning: predictions, the timing model and the planners. Reads a DagSpec and a history
snapshot; never does I/O and never imports the runtime."""

from __future__ import annotations

from collections.abc import Callable

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.history import HistorySnapshot
from dagkube.planning.model import Optimization, Plan, TaskPlan
from dagkube.planning.planners import (
    PlanningOptions,
    plan_non_uniform,
    plan_uniform,
    plan_wukong,
    validate_plan,
)
from dagkube.planning.sla import parse_sla
from dagkube.resources import parse_classes

PLANNER_FUNCTIONS: dict[str, Callable[[DagSpec, PlanningOptions], Plan]] = {
    "wukong": plan_wukong,
    "uniform": plan_uniform,
    "non-uniform": plan_non_uniform,
}
PLANNERS = tuple(PLANNER_FUNCTIONS)

__all__ = [
    "PLANNERS",
    "HistorySnapshot",
    "Optimization",
    "Plan",
    "PlanningOptions",
    "TaskPlan",
    "check_planner",
    "plan",
]


def check_planner(name: str) -> str:
    """Normalize a planner name, or raise listing the accepted ones."""
    normalized = str(name).strip().lower()
    if normalized not in PLANNER_FUNCTIONS:
        raise InvalidOption(f"Planner {name!r} is unknown: choose one of {', '.join(PLANNERS)}")
    return normalized


def plan(dag: DagSpec, planner: str = "wukong", options: PlanningOptions | None = None) -> Plan:
    """Plan a DAG with the named planner; validates the options and the resulting plan."""
    planner = check_planner(planner)
    options = options or PlanningOptions(classes_mib=parse_classes(None))
    options.sla = parse_sla(options.sla)
    options.classes_mib = parse_classes(options.classes_mib)
    if options.memory_per_cpu_mib <= 0:
        raise InvalidOption(f"memory_per_cpu={options.memory_per_cpu_mib} MiB must be > 0")
    if options.max_cpu <= 0:
        raise InvalidOption(f"max_cpu={options.max_cpu} must be > 0")
    if options.cluster_size < 1:
        raise InvalidOption(f"cluster_size={options.cluster_size} must be >= 1")
    result = PLANNER_FUNCTIONS[planner](dag, options)
    validate_plan(dag, result)
    return result
