"""Processor sharing for the timing model: tasks computing at once on cores they share.

Each task puts a demand on the cores (its function's CPU fraction, at most 1). While the
demands add up to more than the cores, every task's CPU part runs at ``cores / demand`` of
its speed and its waiting part (sleep, I/O) at full speed, so a task of CPU fraction ``f``
progresses at ``1 / ((1 - f) + f / share)``. A task's remaining work is re-timed whenever a
task starts or ends computing; an end computed before a re-timing is stale (its version is
older), and the caller drops it.

The history the predictions learn from was measured under the same sharing:
:func:`alone_times` takes it out of each sample, so that it is not counted twice.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from dagkube.planning.fitting import statistic
from dagkube.planning.history import TaskSample

End = tuple[float, str, int]  # (time, task id, version): when a task would end computing


@dataclass
class _Computing:
    left_s: float  # work left, in seconds it takes alone
    demand: float
    since_s: float  # left_s is as of this time
    speed: float = 0.0
    version: int = 0


class SharedCores:
    """The tasks computing now on ``cores`` shared cores."""

    def __init__(self, cores: int) -> None:
        if cores < 1:
            raise ValueError(f"cores={cores} is invalid: use a whole number >= 1")
        self.cores = cores
        self._computing: dict[str, _Computing] = {}
        self._demand = 0.0  # of the tasks computing, kept as they start and end
        self._last_share = 1.0  # the share every entry's speed was set at

    def start(self, time_s: float, task_id: str, work_s: float, demand: float) -> list[End]:
        """The task begins computing ``work_s`` seconds of work (alone); the ends that moved."""
        entry = self._computing[task_id] = _Computing(work_s, min(max(demand, 0.0), 1.0), time_s)
        self._demand += entry.demand
        return self._share(time_s, entry, task_id)

    def finish(self, time_s: float, task_id: str, version: int) -> list[End] | None:
        """The task's end event fired: None if it is stale, else the ends that moved."""
        entry = self._computing.get(task_id)
        if entry is None or entry.version != version:
            return None
        del self._computing[task_id]
        self._demand = self._demand - entry.demand if self._computing else 0.0
        return self._share(time_s)

    def _share(
        self, time_s: float, started: _Computing | None = None, task_id: str = ""
    ) -> list[End]:
        if self._demand < self.cores - 1e-9 and self._last_share == 1.0:
            # The cores are not oversubscribed, before or now: no other task's speed moves
            # (a speed depends only on its demand and the share), only the new one is timed.
            if started is None:
                return []
            started.speed = _speed(started.demand, 1.0)
            started.version += 1
            return [(time_s + started.left_s / started.speed, task_id, started.version)]
        total = self._demand = sum(entry.demand for entry in self._computing.values())
        share = min(1.0, self.cores / total) if total else 1.0
        self._last_share = share
        moved = []
        for task_id, entry in self._computing.items():
            entry.left_s = max(0.0, entry.left_s - (time_s - entry.since_s) * entry.speed)
            entry.since_s = time_s
            speed = _speed(entry.demand, share)
            if speed != entry.speed:
                entry.speed = speed
                entry.version += 1
                moved.append((time_s + entry.left_s / speed, task_id, entry.version))
        return moved


def _speed(demand: float, share: float) -> float:
    """How fast a task of CPU fraction ``demand`` progresses when its CPU part gets ``share``
    of a core (its waiting part runs at full speed)."""
    return 1.0 / ((1.0 - demand) + demand / share)


def cpu_fraction(samples: Sequence[TaskSample]) -> float:
    """The share of its execution a function's thread spent on a CPU: the p90 of its samples'
    CPU time / wall time (the least contended show it best); 0 where not measured."""
    ratios = [min(s.cpu_s / s.exec_s, 1.0) for s in samples if s.exec_s > 0 and s.cpu_s > 0]
    return statistic(ratios, 90) if ratios else 0.0


def alone_times(
    samples: Sequence[TaskSample], fractions: Mapping[str, float], cores: int
) -> list[float]:
    """Each sample's execution time without the contention of its own run: the tasks of that
    run computing at the same time put a mean demand on the cores over its execution (its
    own included); where that exceeded ``cores``, its CPU part ran at cores / demand, which
    is undone here (the timing model adds it back for the run it predicts). Contention from
    outside the run stays in the sample: it is part of the machine the next run meets."""
    alone = [s.exec_s for s in samples]
    by_run: dict[str, list[int]] = defaultdict(list)
    for index, sample in enumerate(samples):
        if sample.run_id and sample.exec_s > 0 and fractions.get(sample.function, 0.0) > 0:
            by_run[sample.run_id].append(index)
    for indices in by_run.values():
        workers = {samples[index].worker_id for index in indices}
        if "" not in workers and len(workers) <= cores:
            continue  # a worker computes one task at a time: never more demand than cores
        steps: list[tuple[float, float]] = []
        for index in indices:
            sample = samples[index]
            demand = fractions[sample.function]
            steps += [(sample.started_at, demand), (sample.started_at + sample.exec_s, -demand)]
        area, peak = _area(steps)
        if peak <= cores:  # never more demand than cores: no sample of this run was slowed
            continue
        for index in indices:
            sample = samples[index]
            mean = (
                area(sample.started_at + sample.exec_s) - area(sample.started_at)
            ) / sample.exec_s
            if mean > cores:
                demand = fractions[sample.function]
                alone[index] = sample.exec_s / ((1.0 - demand) + demand * mean / cores)
    return alone


def _area(steps: list[tuple[float, float]]) -> tuple[Callable[[float], float], float]:
    """The integral from the first step to ``t`` of the demand that steps up and down, and
    the highest the demand got."""
    steps.sort()
    times: list[float] = []
    areas: list[float] = []
    levels: list[float] = []
    area = level = peak = 0.0
    for time_s, change in steps:
        if times:
            area += level * (time_s - times[-1])
        level += change
        if level > peak:
            peak = level
        times.append(time_s)
        areas.append(area)
        levels.append(level)

    def at(time_s: float) -> float:
        k = bisect.bisect_right(times, time_s) - 1
        return 0.0 if k < 0 else areas[k] + levels[k] * (time_s - times[k])

    return at, peak
