"""I/O-bound unequal branches: a long chain of steps, and short branches beside it that wait
on a slow service (simulated by a sleep), then a join. Waiting needs neither memory nor CPU,
so a small class serves a waiting branch as fast as a large one: the case where the
non-uniform planner saves GB-seconds when worker limits are enforced (a CPU-bound branch
would run slower on a small class, see cpu_branches.py).

Every worker starts cold in a serverless setting; compare with:
    dagkube experiment examples/io_branches.py --planners uniform,non-uniform --slas avg \\
        --cold --max-workers 4
"""

from __future__ import annotations

import time

import dagkube

LONG_STEPS = [1.0, 1.0, 1.0]  # seconds, the critical branch
WAITS = [0.8, 0.8, 0.8]  # seconds each short branch waits on the service


@dagkube.task
def source() -> int:
    return 1


@dagkube.task
def long_step(x: int, seconds: float) -> int:
    time.sleep(seconds)
    return x + 1


@dagkube.task
def call_service(x: int, index: int, seconds: float) -> int:
    time.sleep(seconds)  # waiting for a reply: no CPU, no memory
    return x * 10 + index


@dagkube.task
def join(long_result: int, replies: list[int]) -> dict:
    return {"long": long_result, "replies": replies}


def build() -> dagkube.Workflow:
    start = source()
    branch = start
    for seconds in LONG_STEPS:
        branch = long_step(branch, seconds)
    replies = [call_service(start, i, s) for i, s in enumerate(WAITS)]
    return dagkube.Workflow(join(branch, replies), name="io-branches")


def verify(result: dict) -> None:
    assert result["long"] == 1 + len(LONG_STEPS), result
    assert result["replies"] == [10 + i for i in range(len(WAITS))], result
