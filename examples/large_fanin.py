"""Large intermediate outputs feeding a fan-in: the case pre-loading is for.

Four producers of different lengths each make an 16 MB array; ``merge`` needs all four. The
fan-in runs where its last input is produced, so the other three arrays must be downloaded
and deserialized. With ``preload`` that worker fetches each array in the background as soon as
it is stored, while it still runs its own producer, and ``merge`` starts with its inputs local:
    dagkube experiment examples/large_fanin.py --planners uniform,uniform-opt --slas avg
"""

from __future__ import annotations

import time

import numpy as np

import dagkube

DURATIONS_S = [0.2, 0.4, 0.6, 1.0]
ELEMENTS = 2_000_000  # float64: 16 MB per array


@dagkube.task
def produce(index: int, seconds: float) -> np.ndarray:
    time.sleep(seconds)
    return np.full(ELEMENTS, float(index + 1))


@dagkube.task
def merge(arrays: list[np.ndarray]) -> float:
    return float(sum(a.sum() for a in arrays))


def build() -> dagkube.Workflow:
    arrays = [produce(i, s) for i, s in enumerate(DURATIONS_S)]
    return dagkube.Workflow(merge(arrays), name="large-fanin")


def verify(result: float) -> None:
    expected = float(ELEMENTS * sum(i + 1 for i in range(len(DURATIONS_S))))
    assert result == expected, f"got {result}, expected {expected}"
