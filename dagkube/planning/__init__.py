"""Planning: predictions, the timing model and the planners. Reads a DagSpec and a history
snapshot; never does I/O and never imports the runtime."""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from dagkube.errors import InvalidOption
from dagkube.planning.model import (
    AUTO,
    OPT_VARIANTS,
    OPTIMIZATIONS,
    SIMPLICITY,
    Alternative,
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

if TYPE_CHECKING:
    from dagkube.dag import DagSpec
    from dagkube.planning.history import HistorySnapshot
    from dagkube.planning.objective import OBJECTIVES, check_max_gb_s, check_objective
    from dagkube.planning.optimizations import check_optimizations, split_planner
    from dagkube.planning.options import PlanningOptions

# The planners load on first use: a worker reads plans (:mod:`.model`) and nothing else of
# planning, and every module it imports is CPU its cold start pays (at its class's share).
_ON_FIRST_USE = {
    "HistorySnapshot": "dagkube.planning.history",
    "OBJECTIVES": "dagkube.planning.objective",
    "check_max_gb_s": "dagkube.planning.objective",
    "check_objective": "dagkube.planning.objective",
    "check_optimizations": "dagkube.planning.optimizations",
    "split_planner": "dagkube.planning.optimizations",
    "PlanningOptions": "dagkube.planning.options",
}

DEFAULT_PLANNER = AUTO
PLANNERS = (*SIMPLICITY, AUTO)
PLANNER_NAMES = PLANNERS + tuple(f"{name}-opt" for name in OPT_VARIANTS)

__all__ = [
    "DEFAULT_PLANNER",
    "OBJECTIVES",
    "OPTIMIZATIONS",
    "PLANNERS",
    "PLANNER_NAMES",
    "Alternative",
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
    "check_max_gb_s",
    "check_objective",
    "check_optimizations",
    "check_planner",
    "plan",
    "split_planner",
]


def check_planner(name: str) -> str:
    """Normalize a planner name (``-opt`` variants included), or raise listing the accepted."""
    normalized = str(name).strip().lower()
    if normalized not in PLANNER_NAMES:
        raise InvalidOption(
            f"Planner {name!r} is unknown: choose one of {', '.join(PLANNER_NAMES)}"
        )
    return normalized


def plan(
    dag: DagSpec, planner: str = DEFAULT_PLANNER, options: PlanningOptions | None = None
) -> Plan:
    """Plan a DAG with the named planner; validates the options and the resulting plan.

    A ``-opt`` variant (e.g. ``uniform-opt``) is its planner with the optimizations of
    :data:`OPT_VARIANTS` switched on, besides any in ``options.optimizations``; each is
    applied only where the timing model predicts it helps ``options.objective``. ``auto``
    evaluates every planner with and without them and keeps the best (:mod:`.choice`)."""
    with _collector_paused():
        return _plan(dag, planner, options)


def __getattr__(name: str) -> Any:
    module = _ON_FIRST_USE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def _plan(dag: DagSpec, planner: str, options: PlanningOptions | None) -> Plan:
    from dagkube.planning.choice import plan_auto, plan_named
    from dagkube.planning.objective import check_max_gb_s, check_objective
    from dagkube.planning.optimizations import check_optimizations, split_planner
    from dagkube.planning.options import PlanningOptions
    from dagkube.planning.sla import parse_sla
    from dagkube.planning.validation import validate_plan
    from dagkube.resources import parse_classes

    label = check_planner(planner)
    planner, implied = split_planner(label)
    options = options or PlanningOptions.for_run()
    options.optimizations = check_optimizations([*options.optimizations, *implied])
    options.label = label
    options.sla = parse_sla(options.sla)
    options.objective = check_objective(options.objective)
    options.max_gb_s = check_max_gb_s(options.max_gb_s)
    options.classes_mib = parse_classes(options.classes_mib)
    if options.memory_per_cpu_mib <= 0:
        raise InvalidOption(f"memory_per_cpu={options.memory_per_cpu_mib} MiB must be > 0")
    if options.max_cpu <= 0:
        raise InvalidOption(f"max_cpu={options.max_cpu} must be > 0")
    if options.cluster_size < 1:
        raise InvalidOption(f"cluster_size={options.cluster_size} must be >= 1")
    result = plan_auto(dag, options) if planner == AUTO else plan_named(dag, planner, options)
    validate_plan(dag, result)
    return result


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Planning allocates many short-lived objects and no reference cycles worth collecting:
    the cyclic collector would traverse every object of the caller's process (the user's
    data included) a few dozen times per plan, 15-25% of a 1,000-task plan. Reference
    counting still frees everything; a collection that was due runs after."""
    if not gc.isenabled():  # the caller's choice: left as it is
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
