"""CPU-bound unequal branches: a long chain of compute steps, short compute branches beside
it, then a join. Every task burns CPU in pure Python (one thread), so where worker limits are
enforced a smaller class runs it measurably slower: a 512 MiB worker gets 0.29 of a core, a
1 GiB one 0.57, a 2 GiB one a whole core (a single thread cannot use more).

For a CPU-bound task, GB-seconds hardly depend on the class (half the memory, twice the
time): downgrading saves little, and slows what it touches. Compare the planners with:
    dagkube experiment examples/cpu_branches.py --planners uniform,non-uniform --slas avg
"""

from __future__ import annotations

import dagkube

LONG_STEPS = [3_000_000, 3_000_000, 3_000_000]  # loop iterations, the critical branch
SHORT_BRANCHES = 4
SHORT_WORK = 1_500_000  # a few CFS periods (100 ms) even on 2 GiB: less quantization jitter


def spin(iterations: int) -> int:
    """Deterministic CPU work: a sum of squares modulo a prime."""
    total = 0
    for i in range(iterations):
        total = (total + i * i) % 1_000_003
    return total


@dagkube.task
def source() -> int:
    return 1


@dagkube.task
def long_step(x: int, iterations: int) -> int:
    return x + spin(iterations) % 7


@dagkube.task
def short_step(x: int, index: int, iterations: int) -> int:
    return x * 10 + index + spin(iterations) % 3


@dagkube.task
def join(long_result: int, shorts: list[int]) -> dict:
    return {"long": long_result, "shorts": shorts}


def build() -> dagkube.Workflow:
    start = source()
    branch = start
    for iterations in LONG_STEPS:
        branch = long_step(branch, iterations)
    shorts = [short_step(start, i, SHORT_WORK) for i in range(SHORT_BRANCHES)]
    return dagkube.Workflow(join(branch, shorts), name="cpu-branches")


def expected() -> dict:
    value = 1
    for iterations in LONG_STEPS:
        value += spin(iterations) % 7
    return {
        "long": value,
        "shorts": [10 + i + spin(SHORT_WORK) % 3 for i in range(SHORT_BRANCHES)],
    }


def verify(result: dict) -> None:
    assert result == expected(), result
