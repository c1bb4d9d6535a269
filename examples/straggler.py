"""A straggler upstream: the case task duplication is for.

``fetch`` usually takes 0.2 s, but like a request to an overloaded service it sometimes
stalls for 3 s (here: at random, half of the time). ``analyze`` needs it and the long
``simulate``. With ``taskdup``, the worker that finished ``simulate`` and waits for ``fetch``
sees it running far past its prediction and runs a duplicate itself; whichever copy finishes
first is used. Plan for the typical case (p50), else the prediction expects the stall:
    dagkube experiment examples/straggler.py --planners uniform,uniform-opt --slas p50
"""

from __future__ import annotations

import random
import time

import dagkube

SIMULATE_S = 1.0
FETCH_S = 0.2
STALL_S = 3.0
STALL_CHANCE = 0.5


@dagkube.task
def simulate(steps: int) -> list[int]:
    time.sleep(SIMULATE_S)
    return [step * step for step in range(steps)]


@dagkube.task
def fetch(key: str) -> dict:
    stalled = random.SystemRandom().random() < STALL_CHANCE
    time.sleep(STALL_S if stalled else FETCH_S)
    return {"key": key, "scale": len(key)}


@dagkube.task
def analyze(series: list[int], reference: dict) -> int:
    return sum(series) * reference["scale"]


def build() -> dagkube.Workflow:
    return dagkube.Workflow(analyze(simulate(10), fetch("reference")), name="straggler")


def verify(result: int) -> None:
    expected = sum(s * s for s in range(10)) * len("reference")
    assert result == expected, f"got {result}, expected {expected}"
