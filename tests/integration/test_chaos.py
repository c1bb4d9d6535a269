"""Chaos on the local runtime: several workflows run at once while a random worker (one up
for 3 s at least) is SIGKILLed every 2 s; every result is right and nothing is lost (each
killed worker's work is re-queued and resumed, storing what it makes from then on). Bounded to
about half a minute so it can run in CI."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import psutil
import pytest

import dagkube
from dagkube.store.keys import hist_run

pytestmark = pytest.mark.integration

KILL_EVERY_S = 2.0
ROUNDS = 3  # runs of each workflow, one after the other, the three workflows at once
MIN_AGE_S = 3.0


def age_s(pid: int) -> float:
    try:
        return time.time() - psutil.Process(pid).create_time()
    except psutil.NoSuchProcess:
        return 0.0


@dagkube.task
def chaos_leaf(i: int) -> int:
    time.sleep(0.15)
    return i * i


@dagkube.task
def chaos_step(value: int, i: int) -> int:
    time.sleep(0.1)
    return value + i


@dagkube.task
def chaos_sum(values: list[int]) -> int:
    return sum(values)


def fan_in(width: int, name: str) -> tuple[dagkube.Workflow, int]:
    return (
        dagkube.Workflow(chaos_sum([chaos_leaf(i) for i in range(width)]), name=name),
        sum(i * i for i in range(width)),
    )


def chain(length: int, name: str) -> tuple[dagkube.Workflow, int]:
    value = chaos_leaf(1)
    for i in range(length):
        value = chaos_step(value, i)
    return dagkube.Workflow(value, name=name), 1 + sum(range(length))


def test_random_worker_kills_during_concurrent_runs_lose_nothing(make_runtime, redis_client):
    rt = make_runtime(max_workers=3)
    rng = random.Random(20261126)
    workflows = [fan_in(30, "chaos-fan-in"), chain(25, "chaos-chain"), fan_in(20, "chaos-wide")]
    results: dict[str, list[tuple[int, int, str]]] = {wf.name: [] for wf, _ in workflows}
    errors: list[BaseException] = []

    def run_rounds(wf: dagkube.Workflow, expected: int) -> None:
        try:
            for _ in range(ROUNDS):
                outcome = rt.run(wf.dag, rt.plan(wf.dag))
                assert outcome.status == "succeeded", (outcome.run_id, outcome.record.error)
                results[wf.name].append((outcome.outputs, expected, outcome.run_id))
        except BaseException as exc:  # reported by the test below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=run_rounds, args=pair) for pair in workflows]
    for thread in threads:
        thread.start()
    kills = 0
    while any(thread.is_alive() for thread in threads):
        time.sleep(KILL_EVERY_S)
        # A worker up for MIN_AGE_S at least: one killed every 2 s whatever its age could be
        # the run's only worker, killed again and again before it gets to work.
        pids = [pid for pid in rt.worker_pids().values() if age_s(pid) >= MIN_AGE_S]
        if pids and any(thread.is_alive() for thread in threads):
            victim = rng.choice(sorted(pids))
            try:
                os.kill(victim, signal.SIGKILL)
                kills += 1
            except ProcessLookupError:
                pass
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert kills >= 3, f"only {kills} kills: the runs ended too soon to test anything"
    for name, outcomes in results.items():
        assert len(outcomes) == ROUNDS, (name, outcomes)
        for output, expected, run_id in outcomes:
            assert output == expected, (name, run_id, output, expected)
            meta = redis_client.hgetall(hist_run(run_id, "meta"))
            assert meta[b"status"] == b"succeeded"
    lost = sum(
        int(redis_client.hget(hist_run(run_id, "meta"), "workers_lost") or 0)
        for outcomes in results.values()
        for _, _, run_id in outcomes
    )
    assert lost >= 1  # the kills hit workers holding work, and that work was re-run
    print(f"chaos: {kills} workers killed, {lost} holding work, 9 runs all correct")
