"""Plans that never lose: optimizations and downgrades kept only where the timing model
predicts them to help the objective, the ``auto`` planner's choice among candidates, the GB-s
budget, and the candidates recorded in the Plan."""

from __future__ import annotations

import json
import sys

import pytest

import dagkube
from dagkube.errors import InvalidOption
from dagkube.planning import PlanningOptions, choice, plan
from dagkube.planning.history import HistorySnapshot, StartupSample, TaskSample
from dagkube.planning.model import Plan
from dagkube.planning.objective import Goal, Prediction
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))

import large_fanin
import long_then_wide
import unequal_branches

CLASSES = [512, 1024, 2048]


def history(samples: list[tuple[str, str, int, float]], cold_s: float) -> HistorySnapshot:
    """Three earlier runs: per (task id, function, output bytes, seconds) on every class;
    cold start-ups of ``cold_s``, warm ones of 5 ms."""
    tasks = [
        TaskSample(function, memory, 100, out, seconds, task_id=task_id)
        for task_id, function, out, seconds in samples
        for memory in CLASSES
        for _ in range(3)
    ]
    startups = [StartupSample(m, c, cold_s if c else 0.005) for m in CLASSES for c in (1, 0)]
    return HistorySnapshot("h", 3, tasks, startups * 3)


# A long task, then a fan-out whose workers start cold (2.3 s): pre-warming hides the start
# but its workers are charged from their spawn.
LONG_THEN_WIDE = history(
    [("prepare#0", "prepare", 100, 3.0), ("combine#0", "combine", 10, 0.001)]
    + [(f"part#{i}", "part", 10, 0.3) for i in range(long_then_wide.WIDTH)],
    cold_s=2.3,
)
# Four 16 MB outputs gathered by one task: where the fan-in runs and pre-loading matter.
LARGE_FANIN = history(
    [(f"produce#{i}", "produce", 16_000_000, s) for i, s in enumerate(large_fanin.DURATIONS_S)]
    + [("merge#0", "merge", 8, 0.05)],
    cold_s=0.3,
)
WORKLOADS = {
    "long-then-wide": (long_then_wide.build, LONG_THEN_WIDE),
    "large-fanin": (large_fanin.build, LARGE_FANIN),
    "unequal-branches": (unequal_branches.build, HistorySnapshot()),
}


def planned(workload: str, planner: str, **extra) -> Plan:
    build, snapshot = WORKLOADS[workload]
    options = PlanningOptions.for_run(CLASSES, history=snapshot, max_workers=10, **extra)
    return plan(build().dag, planner, options)


def prediction(alternative) -> Prediction:
    return Prediction(alternative.model_makespan_s, alternative.predicted_gb_s)


def chosen(result: Plan):
    [found] = [a for a in result.alternatives if a.chosen]
    return found


def test_the_objectives_order_plans_and_ties_keep_the_simpler():
    fast_dear, slow_cheap = Prediction(1.0, 10.0), Prediction(2.0, 4.0)
    assert Goal("makespan").better(fast_dear, slow_cheap)
    assert Goal("cost").better(slow_cheap, fast_dear)
    assert Goal("balanced").better(slow_cheap, fast_dear)  # 8 < 10
    # Within MAKESPAN_TOLERANCE the makespans tie: the GB-s decides, else nothing does.
    assert Goal("makespan").better(Prediction(1.004, 5.0), Prediction(1.0, 6.0))
    assert not Goal("makespan").better(Prediction(0.999, 5.0), Prediction(1.0, 5.0))
    assert not Goal("makespan").better(Prediction(1.0, 5.0), Prediction(0.999, 5.0))
    # A budget: within it beats over it; over it, the cheaper wins whatever the objective.
    budget = Goal("makespan", max_gb_s=5.0)
    assert budget.better(slow_cheap, fast_dear)
    assert Goal("makespan", max_gb_s=3.0).better(slow_cheap, fast_dear)
    assert budget.better(Prediction(1.5, 4.5), slow_cheap)


def test_bad_objectives_and_budgets_name_the_value_and_what_is_accepted():
    with pytest.raises(
        InvalidOption, match="Objective 'speed' is unknown: choose one of makespan, cost, balanced"
    ):
        planned("unequal-branches", "auto", objective="speed")
    options = PlanningOptions.for_run(CLASSES)
    options.max_gb_s = -1.0
    with pytest.raises(InvalidOption, match=r"GB-s budget -1\.0 is not valid: use a positive"):
        plan(unequal_branches.build().dag, "wukong", options)


def test_prewarm_predicted_to_cost_more_is_not_applied_when_cost_is_the_objective():
    fast = planned("long-then-wide", "wukong-opt", objective="makespan")
    cheap = planned("long-then-wide", "wukong-opt", objective="cost")
    plain = {a.label: a for a in cheap.alternatives}["wukong"]
    warmed = {a.label: a for a in cheap.alternatives}["wukong+prewarm"]
    # What the model predicts here: pre-warming hides the cold starts and costs GB-s.
    assert warmed.model_makespan_s < plain.model_makespan_s * 0.9
    assert warmed.predicted_gb_s > plain.predicted_gb_s * 1.05
    assert not any(o.name == "prewarm" for t in cheap.tasks.values() for o in t.optimizations)
    assert cheap.predicted_gb_s == pytest.approx(plain.predicted_gb_s, abs=1e-6)
    assert chosen(cheap).label == "wukong" and not warmed.chosen
    assert any(
        n.startswith("prewarm: predicted GB-s") and n.endswith("without: not applied")
        for n in cheap.notes
    )
    assert warmed.rejected is not None and "no better than wukong" in warmed.rejected
    # For the makespan the same request is worth it.
    assert chosen(fast).label == "wukong+prewarm"
    assert any(o.name == "prewarm" for t in fast.tasks.values() for o in t.optimizations)
    assert any(n.endswith("without: applied") for n in fast.notes)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("objective", ["makespan", "cost", "balanced"])
@pytest.mark.parametrize("planner", ["wukong-opt", "uniform-opt", "non-uniform-opt"])
def test_a_named_planner_never_loses_against_its_plain_plan(workload, objective, planner):
    """An -opt plan is predicted no worse than the plain plan it started from (and
    non-uniform no worse than uniform): every step it kept was predicted better."""
    result = planned(workload, planner, objective=objective)
    goal = Goal(objective)
    final = chosen(result)
    base = planner.removesuffix("-opt")
    plain = {a.label: a for a in result.alternatives}
    assert final.label.split("+")[0] == base
    for simpler in [base, "uniform"] if base == "non-uniform" else [base]:
        if simpler in plain and plain[simpler] is not final:
            assert not goal.better(prediction(plain[simpler]), prediction(final))
    assert result.model_makespan_s == pytest.approx(final.model_makespan_s, abs=1e-6)
    assert result.predicted_gb_s == pytest.approx(final.predicted_gb_s, abs=1e-6)
    applied = {o.name for t in result.tasks.values() for o in t.optimizations}
    assert applied <= set(final.label.split("+")[1:])


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
@pytest.mark.parametrize("objective", ["makespan", "cost", "balanced"])
def test_auto_keeps_a_candidate_no_other_beats(workload, objective):
    result = planned(workload, "auto", objective=objective)
    goal = Goal(objective)
    best = chosen(result)
    labels = [a.label for a in result.alternatives]
    assert {"wukong", "uniform"} <= set(labels)
    assert not any(goal.better(prediction(a), prediction(best)) for a in result.alternatives)
    assert all(a.rejected for a in result.alternatives if not a.chosen)
    assert result.planner == "auto" and result.objective == objective
    assert result.optimizations == best.label.split("+")[1:]
    assert result.notes[0].startswith(f"auto: {best.label} chosen for objective {objective}")


def test_auto_picks_the_fastest_for_makespan_and_the_cheapest_for_cost():
    fast = planned("long-then-wide", "auto", objective="makespan")
    cheap = planned("long-then-wide", "auto", objective="cost")
    candidates = fast.alternatives
    quickest = min(a.model_makespan_s for a in candidates)
    cheapest = min(a.predicted_gb_s for a in candidates)
    assert chosen(fast).model_makespan_s <= quickest * 1.005
    assert chosen(cheap).predicted_gb_s <= cheapest * 1.005
    assert chosen(fast).label != chosen(cheap).label  # the two objectives disagree here


def test_a_gb_s_budget_keeps_the_fastest_plan_within_it_or_else_the_cheapest():
    free = planned("long-then-wide", "auto")
    candidates = {a.label: a for a in free.alternatives}
    fastest = chosen(free)
    # A budget just below the fastest plan's GB-s: the fastest of those within it.
    budget = fastest.predicted_gb_s * 0.9
    within = [a for a in candidates.values() if a.predicted_gb_s <= budget]
    assert within, "the workload should have a cheaper candidate than the fastest"
    bounded = planned("long-then-wide", "auto", max_gb_s=budget)
    assert bounded.max_gb_s == budget
    assert bounded.predicted_gb_s is not None and bounded.predicted_gb_s <= budget
    assert chosen(bounded).model_makespan_s <= min(a.model_makespan_s for a in within) * 1.005
    # No candidate fits: the cheapest, and a note saying so.
    tight = planned("long-then-wide", "auto", max_gb_s=0.001)
    cheapest = min(a.predicted_gb_s for a in tight.alternatives)
    assert chosen(tight).predicted_gb_s <= cheapest * 1.005
    assert any(n.startswith("no candidate fits the GB-s budget 0.001") for n in tight.notes)


def test_auto_caps_its_candidates_on_large_dags_and_says_so(monkeypatch):
    dag = unequal_branches.build().dag
    # As if the DAG were large: room for only the two plain plans every auto plan makes.
    monkeypatch.setattr(choice, "AUTO_SIMULATED_TASKS", len(dag.tasks) * 2)
    result = plan(dag, "auto", PlanningOptions.for_run(CLASSES))
    assert [a.label for a in result.alternatives] == ["wukong", "uniform"]
    assert any("non-uniform: not tried: the planning budget is spent" in n for n in result.notes)
    assert any("candidates limited to about" in n for n in result.notes)
    assert any("not tried on wukong (planning budget spent)" in n for n in result.notes)


PLAIN = ("wukong", "uniform")


def _fanout_history(seconds: float, width: int) -> HistorySnapshot:
    return history(
        [("src#0", "src", 8, seconds), ("sink#0", "sink", 8, seconds)]
        + [(f"step#{i}", "step", 8, seconds) for i in range(width)],
        cold_s=0.01,
    )


def _fanout(width: int) -> dagkube.Workflow:
    root = dagkube.task(name="src")(lambda: 1)()
    step = dagkube.task(name="step")(lambda v, i: v + i)
    sink = dagkube.task(name="sink")(lambda values: sum(values))
    return dagkube.Workflow(sink([step(root, i) for i in range(width)]), "fanout")


def test_auto_spends_on_candidates_what_a_short_run_can_pay_for():
    """Planning is part of the wait: past the two plain plans, auto simulates no more than
    AUTO_PLANNING_SHARE of the best plain plan's predicted makespan pays for (at
    SIMULATED_TASK_S per task); a longer run of the same shape gets the whole search."""
    dag = _fanout(300).dag

    def options(seconds: float) -> PlanningOptions:
        return PlanningOptions.for_run(
            CLASSES, history=_fanout_history(seconds, 300), max_workers=2
        )

    short = plan(dag, "auto", options(1e-4))
    plain_s = min(a.model_makespan_s for a in short.alternatives if a.label in PLAIN)
    share = choice.AUTO_PLANNING_SHARE * plain_s
    allowed = int(share / (len(dag.tasks) * choice.SIMULATED_TASK_S))
    assert allowed < 3, "the fan-out should be short enough to cut the search"
    # Each simulation adds at most one candidate; non-uniform's downgrade trials none.
    assert len(short.alternatives) <= 2 + allowed
    assert any(
        f"predicted to take {plain_s:.3f}s: candidates limited to about 10%" in n
        for n in short.notes
    ), short.notes
    long = plan(dag, "auto", options(0.5))
    assert len(long.alternatives) > len(short.alternatives)
    assert not any("candidates limited" in n for n in long.notes), long.notes


def test_the_candidates_round_trip_and_older_plans_parse_without_them():
    result = planned("large-fanin", "auto", objective="balanced", max_gb_s=100.0)
    assert len(result.alternatives) > 2
    again = Plan.model_validate_json(result.model_dump_json())
    assert again == result
    assert [a.model_dump() for a in again.alternatives] == [
        a.model_dump() for a in result.alternatives
    ]
    stored = json.loads(result.model_dump_json())
    for name in ("objective", "max_gb_s", "alternatives"):
        del stored[name]
    older = Plan.model_validate_json(json.dumps(stored))
    assert (older.objective, older.max_gb_s, older.alternatives) == ("makespan", None, [])


def test_the_sdk_passes_the_objective_and_the_budget():
    wf = large_fanin.build()
    result = wf.plan(objective="cost", max_gb_s=50, classes=CLASSES)
    assert (result.planner, result.objective, result.max_gb_s) == ("auto", "cost", 50.0)
    assert any(a.chosen for a in result.alternatives)
    with pytest.raises(InvalidOption, match="Objective 'cheap' is unknown"):
        wf.plan(objective="cheap")


@dagkube.task
def big_block() -> bytes:
    return b""


@dagkube.task
def tiny_flag() -> int:
    return 0


@dagkube.task
def merge_pair(block: bytes, flag: int) -> int:
    return flag


def test_preload_predicted_to_slow_the_fan_in_is_not_applied():
    """A 200 MB input ready just before a tiny one: placed for pre-loading, the fan-in would
    join the tiny input's worker and wait for 200 MB to be uploaded and fetched; plain
    placement runs it where the 200 MB already is. The model predicts that, so preload is
    not applied and the plan keeps the plain placement."""
    wf = dagkube.Workflow(merge_pair(big_block(), tiny_flag()), name="big-and-tiny")
    snapshot = history(
        [
            ("big_block#0", "big_block", 200_000_000, 1.0),
            ("tiny_flag#0", "tiny_flag", 8, 1.05),
            ("merge_pair#0", "merge_pair", 8, 0.05),
        ],
        cold_s=0.3,
    )
    options = PlanningOptions.for_run(CLASSES, history=snapshot, optimizations=["preload"])
    result = plan(wf.dag, "uniform", options)
    by_label = {a.label: a for a in result.alternatives}
    assert by_label["uniform+preload"].model_makespan_s > by_label["uniform"].model_makespan_s
    assert chosen(result).label == "uniform"
    assert not any(t.optimizations for t in result.tasks.values())
    assert result.tasks["merge_pair#0"].worker_id == result.tasks["big_block#0"].worker_id
    [note] = [n for n in result.notes if n.startswith("preload:")]
    assert note.startswith("preload: predicted makespan") and note.endswith("not applied")
    # auto, evaluating the same candidates, does not pick it either.
    picked = plan(wf.dag, "auto", PlanningOptions.for_run(CLASSES, history=snapshot))
    assert "preload" not in chosen(picked).label.split("+")


def test_auto_keeps_an_optimization_nobody_asked_for_only_for_a_clear_predicted_gain():
    """The model's predictions of one plan against another are not closer than a few
    percent: tried unasked, an optimization must win by more than AUTO_MIN_GAIN (3%) on the
    objective; asked for, any predicted gain keeps it, as for a named planner."""
    slow = history(
        [
            (f"produce#{i}", "produce", 16_000_000, 8 * s)
            for i, s in enumerate(large_fanin.DURATIONS_S)
        ]
        + [("merge#0", "merge", 8, 0.05)],
        cold_s=0.3,
    )

    def auto(optimizations=None) -> Plan:
        options = PlanningOptions.for_run(
            CLASSES, history=slow, max_workers=10, objective="cost", optimizations=optimizations
        )
        return plan(large_fanin.build().dag, "auto", options)

    unasked = auto()
    [note] = [n for n in unasked.notes if n.startswith("preload:")]
    assert note.endswith("within the 3% auto asks of one without: not applied"), note
    assert chosen(unasked).label == "wukong"
    trial = {a.label: a for a in unasked.alternatives}["wukong+preload"]
    plain = {a.label: a for a in unasked.alternatives}["wukong"]
    assert 1 - trial.predicted_gb_s / plain.predicted_gb_s < choice.AUTO_MIN_GAIN
    assert Goal("cost").better(prediction(trial), prediction(plain))  # a gain, but a small one
    assert chosen(auto(["preload"])).label.endswith("+preload")
    # The tie band: within it the other measure decides, and it too must clear the band.
    wide = Goal("makespan", tolerance=0.03)
    assert not wide.better(Prediction(0.98, 1.0), Prediction(1.0, 1.0))
    assert wide.better(Prediction(0.96, 1.0), Prediction(1.0, 1.0))
    assert wide.better(Prediction(0.99, 0.9), Prediction(1.0, 1.0))
