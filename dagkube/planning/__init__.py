"""Planning: predictions, the timing model and the planners. Reads a DagSpec and a history
snapshot; never does I/O and never imports the runtime."""

from __future__ import annotations

from collections.abc import Callable

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.history import HistorySnapshot
from dagkube.planning.model import (
    OPT_VARIANTS,
    OPTIMIZATIONS,
    Clustering,
    ClusteringParams,
    DelayedIo,
    DelayedIoParams,
    Optimization,
    Plan,
    Preload,
    PreloadParams,
    Prewarm,
    PrewarmParams,
    Taskdup,
    TaskdupParams,
    TaskPlan,
)
from dagkube.planning.optimizations import check_optimizations, split_planner
from dagkube.planning.options import PlanningOptions
from dagkube.planning.planners import plan_non_uniform, plan_uniform, plan_wukong
from dagkube.planning.sla import parse_sla
from dagkube.planning.validation import validate_plan
from dagkube.resources import parse_classes

PLANNER_FUNCTIONS: dict[str, Callable[[DagSpec, PlanningOptions], Plan]] = {
    "wukong": plan_wukong,
    "uniform": plan_uniform,
    "non-uniform": plan_non_uniform,
}
PLANNERS = tuple(PLANNER_FUNCTIONS)
PLANNER_NAMES = PLANNERS + tuple(f"{name}-opt" for name in OPT_VARIANTS)

__all__ = [
    "OPTIMIZATIONS",
    "PLANNERS",
    "PLANNER_NAMES",
    "Clustering",
    "ClusteringParams",
    "DelayedIo",
    "DelayedIoParams",
    "HistorySnapshot",
    "Optimization",
    "Plan",
    "PlanningOptions",
    "Preload",
    "PreloadParams",
    "Prewarm",
    "PrewarmParams",
    "TaskPlan",
    "Taskdup",
    "TaskdupParams",
    "check_optimizations",
    "check_planner",
    "plan",
]


def check_planner(name: str) -> str:
    """Normalize a planner name (``-opt`` variants included), or raise listing the accepted."""
    normalized = str(name).strip().lower()
    if normalized not in PLANNER_NAMES:
        raise InvalidOption(
            f"Planner {name!r} is unknown: choose one of {', '.join(PLANNER_NAMES)}"
        )
    return normalized


def plan(dag: DagSpec, planner: str = "wukong", options: PlanningOptions | None = None) -> Plan:
    """Plan a DAG with the named planner; validates the options and the resulting plan.

    A ``-opt`` variant (e.g. ``uniform-opt``) is its planner with the optimizations of
    :data:`OPT_VARIANTS` switched on, besides any in ``options.optimizations``."""
    label = check_planner(planner)
    planner, implied = split_planner(label)
    options = options or PlanningOptions.for_run()
    options.optimizations = check_optimizations([*options.optimizations, *implied])
    options.label = label
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
