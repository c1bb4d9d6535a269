"""A straggler upstream: the case task duplication is for.

``fetch`` takes 0.2 s, unless its request hits a stuck replica: then its first attempt stalls
for 3 s while a second attempt would be fast (here a third of the runs, at random). ``analyze``
needs it and the long ``simulate``. With ``taskdup``, the worker that finished ``simulate``
and waits for ``fetch`` sees it running far past its prediction and runs a duplicate itself;
whichever copy finishes first is used, so the output is the same:
    dagkube experiment examples/straggler.py --planners uniform,uniform-opt --slas p50
"""

from __future__ import annotations

import random
import tempfile
import time
import uuid
from pathlib import Path

import dagkube

SIMULATE_S = 1.0
FETCH_S = 0.2
STALL_S = 3.0
STALL_CHANCE = 1 / 3


@dagkube.task
def simulate(steps: int) -> list[int]:
    time.sleep(SIMULATE_S)
    return [step * step for step in range(steps)]


@dagkube.task
def fetch(key: str, stuck_marker: str) -> dict:
    """Fast, except the first attempt of a request that hits the stuck replica (named by a
    marker file that does not exist yet): it stalls; later attempts find the marker."""
    marker = Path(stuck_marker)
    if not marker.exists():
        marker.touch()
        time.sleep(STALL_S)
    else:
        time.sleep(FETCH_S)
    return {"key": key, "scale": len(key)}


@dagkube.task
def analyze(series: list[int], reference: dict) -> int:
    return sum(series) * reference["scale"]


def build(stall: bool | None = None, marker_dir: str | None = None) -> dagkube.Workflow:
    """``stall``: whether this run's request hits the stuck replica (random if not given)."""
    if stall is None:
        stall = random.random() < STALL_CHANCE
    folder = Path(marker_dir or tempfile.gettempdir())
    marker = folder / f"dagkube-stuck-{uuid.uuid4().hex}"
    if not stall:
        # A marker that already exists means "not stuck". Stalled and normal runs pass an
        # argument of the same size, so the planner's size-based predictions see the same input.
        marker.touch()
    reference = fetch("reference", str(marker))
    return dagkube.Workflow(analyze(simulate(10), reference), name="straggler")


def verify(result: int) -> None:
    expected = sum(s * s for s in range(10)) * len("reference")
    assert result == expected, f"got {result}, expected {expected}"
