"""What one planning call shares between its candidates: estimates made once per class that
equal those made per plan, and schedules that do not depend on being given them."""

from __future__ import annotations

import dagkube
from dagkube.planning import PlanningOptions
from dagkube.planning.estimates import SharedEstimates, memory_floors
from dagkube.planning.history import HistorySnapshot, StartupSample, TaskSample
from dagkube.planning.predictions import Predictor, estimate
from dagkube.planning.timing import simulate

CLASSES = [512, 1024, 2048]


@dagkube.task
def load(i: int) -> bytes:
    return bytes(i)


@dagkube.task
def crunch(data: bytes) -> bytes:
    return data


@dagkube.task
def merge(parts: list[bytes]) -> int:
    return len(parts)


def workflow() -> dagkube.Workflow:
    return dagkube.Workflow(merge([crunch(load(i)) for i in range(6)]))


def predictor() -> Predictor:
    """Times that differ per class and grow with the input; outputs that grow with it."""
    tasks = [
        TaskSample(function, memory, size, size * 3, seconds * size / 1000 * 2048 / memory)
        for function, seconds in (("load", 0.2), ("crunch", 0.5), ("merge", 0.1))
        for memory in (1024, 2048)
        for size in (1000, 4000, 16000)
    ]
    startups = [StartupSample(m, cold, 0.4 if cold else 0.01) for m in CLASSES for cold in (1, 0)]
    return PlanningOptions.for_run(
        CLASSES, history=HistorySnapshot("h", 3, tasks, startups)
    ).predictor()


def test_shared_estimates_equal_a_plans_own_for_any_classes_per_task():
    dag = workflow().dag
    shared = SharedEstimates(dag, predictor(), 2048)
    mixed = {t: CLASSES[i % 3] for i, t in enumerate(dag.tasks)}
    for memory in (dict.fromkeys(dag.tasks, 512), dict.fromkeys(dag.tasks, 2048), mixed):
        own = estimate(dag, predictor(), memory)
        got = shared.at(memory)
        assert (got.input_bytes, got.out_bytes, got.exec_s) == (
            own.input_bytes,
            own.out_bytes,
            own.exec_s,
        )
    # The classes' times differ (so taking one class's for another would show above).
    assert shared.exec_at(512) != shared.exec_at(2048)
    assert shared.floors() == memory_floors(dag, predictor(), shared.base.input_bytes)


def test_a_schedule_given_shared_estimates_is_the_one_estimated_on_its_own():
    dag = workflow().dag
    shared = SharedEstimates(dag, predictor(), 2048)
    memory = {t: 1024 if t.startswith("crunch") else 2048 for t in dag.tasks}
    flexible: dict[str, str | None] = dict.fromkeys(dag.tasks)
    alone = simulate(dag, memory, flexible, predictor())
    given = simulate(dag, memory, flexible, shared.predictor, sizes=shared.at(memory))
    assert given.makespan_s == alone.makespan_s > 0
    assert given.gb_s == alone.gb_s
    assert {t: (v.start_s, v.complete_s) for t, v in given.tasks.items()} == {
        t: (v.start_s, v.complete_s) for t, v in alone.tasks.items()
    }
