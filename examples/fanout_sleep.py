"""Fan-out/fan-in with fixed, known sleeps: `prepare`, 8 parallel `work` tasks, then `combine`.

Task durations are known in advance (DURATIONS), so measured timings and planner predictions
can be compared against them. Run it with: dagkube run examples/fanout_sleep.py
"""

from __future__ import annotations

import time
from typing import Any

import dagkube

PREPARE_S = 0.2
DURATIONS: list[float] = [0.3, 0.3, 0.5, 0.5, 0.8, 0.8, 1.0, 1.2]
COMBINE_S = 0.1


@dagkube.task
def prepare() -> str:
    time.sleep(PREPARE_S)
    return "prepared"


@dagkube.task
def work(setup: str, index: int, duration: float) -> tuple[int, float]:
    # The duration is an argument rather than looked up in DURATIONS, so the DAG itself says
    # how long each task takes.
    time.sleep(duration)
    return index, duration


@dagkube.task
def combine(setup: str, results: list[tuple[int, float]]) -> dict[str, Any]:
    time.sleep(COMBINE_S)
    return {"setup": setup, "results": list(results)}


def build() -> dagkube.Workflow:
    setup = prepare()
    results = [work(setup, index, duration) for index, duration in enumerate(DURATIONS)]
    return dagkube.Workflow(combine(setup, results), name="fanout-sleep")


def verify(result: dict[str, Any]) -> None:
    expected = [(index, duration) for index, duration in enumerate(DURATIONS)]
    assert result["setup"] == "prepared", f"combine saw setup {result['setup']!r}"
    assert [tuple(r) for r in result["results"]] == expected, (
        f"work results {result['results']} differ from (index, duration) pairs {expected}"
    )
