"""Tree reduction: 64 seeded random integers summed pairwise by 63 `add` tasks in 6 levels.

Shows how an ordinary Python helper (`tree`) builds a balanced DAG from values or task nodes.
Run it with: dagkube run examples/tree_reduction.py
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import dagkube

LEAF_COUNT = 64
SEED = 42
_rng = random.Random(SEED)
LEAVES: list[int] = [_rng.randint(1, 1_000) for _ in range(LEAF_COUNT)]


@dagkube.task
def add(a: int, b: int) -> int:
    return a + b


def tree(leaves: Sequence[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Combine neighbours level by level until one item is left; returns that item.

    `leaves` may hold plain values or task nodes. An odd item out at the end of a level is
    carried up unchanged, so n leaves always take exactly n - 1 `combine` calls.
    """
    if not leaves:
        raise ValueError("tree() needs at least one leaf")
    level = list(leaves)
    while len(level) > 1:
        paired = [combine(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def build() -> dagkube.Workflow:
    return dagkube.Workflow(tree(LEAVES, add), name="tree-reduction")


def verify(result: int) -> None:
    expected = sum(LEAVES)
    assert result == expected, f"tree reduction gave {result}, expected sum(LEAVES) = {expected}"
