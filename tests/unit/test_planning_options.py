"""``PlanningOptions.for_run``: the one factory of planning options every caller uses."""

from __future__ import annotations

import pytest

import dagkube
from dagkube.errors import InvalidOption
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.history import HistorySnapshot
from dagkube.resources import DEFAULT_CLASSES_MIB


@dagkube.task
def double(x: int) -> int:
    return 2 * x


@dagkube.task
def add(a: int, b: int) -> int:
    return a + b


def workflow() -> dagkube.Workflow:
    return dagkube.Workflow(add(double(1), double(2)), name="options")


def test_without_arguments_it_is_the_documented_defaults():
    options = PlanningOptions.for_run()
    assert options == PlanningOptions(classes_mib=list(DEFAULT_CLASSES_MIB))
    assert (options.sla, options.max_workers, options.cpu_enforced) == ("avg", None, True)
    assert options.history == HistorySnapshot() and options.warm_pool == {}


def test_classes_are_parsed_and_optimizations_put_in_composition_order():
    options = PlanningOptions.for_run(
        "1Gi,512Mi", optimizations=["PreWarm", "clustering"], warm_pool={512: 2}
    )
    assert options.classes_mib == [512, 1024]
    assert options.optimizations == ["clustering", "prewarm"]
    assert options.warm_pool == {512: 2}


def test_a_given_warm_pool_is_copied():
    pool = {512: 1}
    options = PlanningOptions.for_run(warm_pool=pool)
    pool[1024] = 3
    assert options.warm_pool == {512: 1}


def test_bad_input_names_the_value():
    with pytest.raises(InvalidOption, match="'warp' is unknown"):
        PlanningOptions.for_run(optimizations=["warp"])
    with pytest.raises(InvalidOption, match="No resource classes"):
        PlanningOptions.for_run([])


def test_workflow_plan_and_plan_without_options_use_it():
    wf = workflow()
    expected = plan(wf.dag, "uniform", PlanningOptions.for_run([512, 1024], sla="p90"))
    assert wf.plan("uniform", "p90", [512, 1024]) == expected
    assert plan(wf.dag, "uniform") == plan(wf.dag, "uniform", PlanningOptions.for_run())
