"""A long task, then a wide fan-out: the case pre-warming is for.

While ``prepare`` runs, nothing else does, so every fan-out worker starts cold just when
``prepare`` ends. With ``prewarm`` the planner sees those cold starts coming and asks the
scaler, while ``prepare`` still runs, for warm workers to be ready in time. Compare (a local
start-up delay makes local workers start as slowly as Pods):
    dagkube experiment examples/long_then_wide.py --planners wukong,wukong-opt \\
        --slas avg --repeat 5 --cold --startup-delay 2 --max-workers 10
"""

from __future__ import annotations

import time

import dagkube

PREPARE_S = 3.0
WIDTH = 6
PART_S = 0.3


@dagkube.task
def prepare() -> list[int]:
    time.sleep(PREPARE_S)
    return list(range(WIDTH))


@dagkube.task
def part(items: list[int], index: int) -> int:
    time.sleep(PART_S)
    return items[index] ** 2


@dagkube.task
def combine(parts: list[int]) -> int:
    return sum(parts)


def build() -> dagkube.Workflow:
    items = prepare()
    return dagkube.Workflow(combine([part(items, i) for i in range(WIDTH)]), name="long-then-wide")


def verify(result: int) -> None:
    expected = sum(i * i for i in range(WIDTH))
    assert result == expected, f"got {result}, expected {expected}"
