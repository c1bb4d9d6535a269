"""Tree reduction: 64 seeded random integers summed pairwise by 63 `add` tasks in 6 levels.

Shows `dagkube.reduce_tree`, which builds a balanced reduction DAG from values or task nodes.
Run it with: dagkube run examples/tree_reduction.py
"""

from __future__ import annotations

import random

import dagkube

LEAF_COUNT = 64
SEED = 42
_rng = random.Random(SEED)
LEAVES: list[int] = [_rng.randint(1, 1_000) for _ in range(LEAF_COUNT)]


@dagkube.task
def add(a: int, b: int) -> int:
    return a + b


def build() -> dagkube.Workflow:
    return dagkube.Workflow(dagkube.reduce_tree(LEAVES, add), name="tree-reduction")


def verify(result: int) -> None:
    expected = sum(LEAVES)
    assert result == expected, f"tree reduction gave {result}, expected sum(LEAVES) = {expected}"
