"""A short workflow for the Redis-fault tests: its first task announces itself in
$DAGKUBE_TEST_MARKER, then a fan-out and a fan-in that need Redis to go on."""

import os
import time
from pathlib import Path

import dagkube

FIRST_S = float(os.environ.get("DAGKUBE_TEST_FIRST_S", "1.0"))


@dagkube.task
def first(marker: str, seconds: float) -> int:
    Path(marker).write_text(str(os.getpid()))
    time.sleep(seconds)
    return 1


@dagkube.task
def then(value: int, step: int) -> int:
    time.sleep(0.3)
    return value + step


@dagkube.task
def total(values: list[int]) -> int:
    return sum(values)


def build():
    start = first(os.environ["DAGKUBE_TEST_MARKER"], FIRST_S)
    return dagkube.Workflow(total([then(start, step) for step in range(3)]), name="cli-blip")


def verify(result: int) -> None:
    assert result == 6, result
