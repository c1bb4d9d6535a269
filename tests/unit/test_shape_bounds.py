"""The shapes benchmark's lower bounds: the window bound is never below the simple one and
never above a schedule that exists."""

from __future__ import annotations

import heapq
import random
import sys

import pytest

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))

from wfshapes import Shape, ShapeTask


def shape(parents: list[tuple[int, ...]]) -> Shape:
    return Shape("t", "test", tuple(ShapeTask("k", 1.0, 1, p) for p in parents))


def list_schedule(s: Shape, durations: list[float], workers: int) -> float:
    """A real schedule's makespan: ready tasks start, in index order, on free workers."""
    remaining = [len(t.parents) for t in s.tasks]
    children: list[list[int]] = [[] for _ in s.tasks]
    for index, task in enumerate(s.tasks):
        for parent in task.parents:
            children[parent].append(index)
    ready = [i for i, n in enumerate(remaining) if n == 0]
    running: list[tuple[float, int]] = []
    now, free = 0.0, workers
    while ready or running:
        ready.sort()
        while ready and free:
            task = ready.pop(0)
            heapq.heappush(running, (now + durations[task], task))
            free -= 1
        now, done = heapq.heappop(running)
        free += 1
        for child in children[done]:
            remaining[child] -= 1
            if not remaining[child]:
                ready.append(child)
    return now


def test_work_behind_a_long_chain_is_bounded_by_its_window():
    # index (10 s) -> four alignments (5 s each) -> merge (3 s), on 2 workers: the simple
    # bound says 18 s (the critical path); nothing can beat 10 + 20 / 2 + 3 = 23 s.
    s = shape([(), (0,), (0,), (0,), (0,), (1, 2, 3, 4)])
    durations = [10.0, 5.0, 5.0, 5.0, 5.0, 3.0]
    assert s.lower_bound_s(durations, 2) == pytest.approx(18.0)
    assert s.window_bound_s(durations, 2) == pytest.approx(23.0)
    assert list_schedule(s, durations, 2) == pytest.approx(23.0)


@pytest.mark.parametrize("seed", range(20))
def test_the_window_bound_lies_between_the_simple_bound_and_a_real_schedule(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 40)
    parents = [
        tuple(sorted(rng.sample(range(i), rng.randint(0, min(i, 3))))) if i else ()
        for i in range(n)
    ]
    s = shape(parents)
    durations = [rng.uniform(0.1, 5.0) for _ in range(n)]
    workers = rng.randint(1, 4)
    simple = s.lower_bound_s(durations, workers)
    window = s.window_bound_s(durations, workers)
    assert simple <= window + 1e-9
    assert window <= list_schedule(s, durations, workers) + 1e-9
