"""Unequal branches: one long critical branch and several short ones, then a join.

The case the non-uniform planner is for: the short branches have slack, so their workers can
run on a smaller (cheaper) class without delaying the run. Compare with:
    dagkube experiment examples/unequal_branches.py --planners uniform,non-uniform --slas avg
"""

from __future__ import annotations

import time

import dagkube

LONG_STEPS = [0.5, 0.5, 0.5]  # seconds, the critical branch
SHORT_BRANCHES = 6
SHORT_S = 0.1


@dagkube.task
def source() -> int:
    return 1


@dagkube.task
def long_step(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + 1


@dagkube.task
def short_step(x: int, index: int) -> int:
    time.sleep(SHORT_S)
    return x * 10 + index


@dagkube.task
def join(long_result: int, shorts: list[int]) -> dict:
    return {"long": long_result, "shorts": shorts}


def build() -> dagkube.Workflow:
    start = source()
    branch = start
    for seconds in LONG_STEPS:
        branch = long_step(branch, seconds)
    shorts = [short_step(start, i) for i in range(SHORT_BRANCHES)]
    return dagkube.Workflow(join(branch, shorts), name="unequal-branches")


def verify(result: dict) -> None:
    assert result["long"] == 1 + len(LONG_STEPS), result
    assert result["shorts"] == [10 + i for i in range(SHORT_BRANCHES)], result
