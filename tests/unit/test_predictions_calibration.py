"""auto's makespan calibration: residuals kept under the planner of the candidate it chose."""

from __future__ import annotations

import pytest

import dagkube
from dagkube.planning import PlanningOptions, plan
from dagkube.planning.history import (
    HistorySnapshot,
    Residual,
    StartupSample,
    TaskSample,
    calibration_key,
)


@dagkube.task
def source():
    return 1


@dagkube.task
def part(x, i):
    return x + i


@dagkube.task
def gather(values):
    return values


def fan() -> dagkube.Workflow:
    start = source()
    return dagkube.Workflow(gather([part(start, i) for i in range(3)]), name="calib")


def snapshot() -> HistorySnapshot:
    tasks = [TaskSample(f, 2048, 100, 100, s) for f, s in (("source", 0.1), ("part", 1.0))] * 5
    tasks += [TaskSample("gather", 2048, 300, 100, 0.1)] * 5
    startups = [StartupSample(2048, True, 0.3)] * 3 + [StartupSample(2048, False, 0.01)] * 3
    return HistorySnapshot("h", 5, tasks, startups)


def test_calibration_key_names_autos_choice_and_keeps_other_planners():
    assert calibration_key("auto", "wukong") == "wukong"
    assert calibration_key("auto", None) == "auto"  # a run stored before its choice was
    assert calibration_key("uniform-opt", "uniform") == "uniform-opt"


def test_an_auto_plan_is_calibrated_by_the_residuals_of_the_planner_it_chose():
    wf = fan()
    history = snapshot()
    raw = plan(wf.dag, "auto", PlanningOptions([2048], history=history))
    chosen = raw.chosen_planner()
    assert chosen in ("wukong", "uniform", "non-uniform")
    other = "uniform" if chosen == "wukong" else "wukong"
    history.residuals = [Residual(chosen, "avg", r) for r in (0.1, 0.2, 0.3)]
    history.residuals += [Residual(other, "avg", 5.0)] * 3  # the other candidate's: ignored
    history.residuals += [Residual("auto", "avg", 9.0)] * 3  # old records, choice unknown
    calibrated = plan(wf.dag, "auto", PlanningOptions([2048], history=history))
    assert calibrated.model_makespan_s == raw.model_makespan_s
    assert calibrated.predicted_makespan_s == pytest.approx(raw.model_makespan_s + 0.2)


def test_the_chosen_planner_is_the_chosen_candidates_planner():
    result = plan(fan().dag, "auto", PlanningOptions([2048], history=snapshot()))
    label = next(a.label for a in result.alternatives if a.chosen)
    assert result.chosen_planner() == label.split("+")[0]
    stored = type(result).model_validate_json(result.model_dump_json())
    assert stored.chosen_planner() == result.chosen_planner()
    old = result.model_copy(update={"alternatives": []})
    assert old.chosen_planner() is None  # plans stored before the candidates were
