"""Experiments: a workflow run over a matrix of planners and SLAs, repeated, compared.

Every run goes through the normal path (planned from the runtime's history, stored in it), so
an experiment both measures the planners and feeds them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from dagkube.errors import InvalidOption, TaskFailed
from dagkube.planning import PLANNER_NAMES, check_planner
from dagkube.planning.sla import parse_sla
from dagkube.store.records import RunStatus
from dagkube.workflow import Workflow


@dataclass
class Sample:
    """One run of the matrix."""

    planner: str
    sla: str
    repeat: int
    run_id: str
    status: str
    makespan_s: float
    predicted_makespan_s: float | None
    gb_s: float
    workers_cold: int
    workers_warm: int
    workers_prewarmed: int = 0
    tasks_duplicated: int = 0
    optimizations: dict[str, int] = field(default_factory=dict)  # marks in the run's plan
    verify_error: str = ""  # the workflow's verify() rejected this run's outputs
    unused_gb_s: float = 0.0  # workers created for the run (pre-warm, demand) that never served

    @property
    def prediction_error(self) -> float | None:
        if not self.predicted_makespan_s or not self.makespan_s:
            return None
        return abs(self.predicted_makespan_s - self.makespan_s) / self.makespan_s

    @property
    def within_prediction(self) -> bool | None:
        if not self.predicted_makespan_s:
            return None
        return self.makespan_s <= self.predicted_makespan_s


@dataclass
class Summary:
    """One (planner, SLA) cell of the comparison."""

    planner: str
    sla: str
    runs: int
    failed: int
    median_makespan_s: float | None
    median_gb_s: float | None
    workers_cold: int
    workers_warm: int
    median_prediction_error: float | None
    sla_attainment: float | None  # share of runs that finished within the predicted makespan
    workers_prewarmed: int = 0
    tasks_duplicated: int = 0
    median_optimizations: dict[str, float] = field(default_factory=dict)  # per run
    median_unused_gb_s: float | None = None


@dataclass
class Experiment:
    samples: list[Sample] = field(default_factory=list)

    def summaries(self) -> list[Summary]:
        cells: dict[tuple[str, str], list[Sample]] = {}
        for sample in self.samples:
            cells.setdefault((sample.planner, sample.sla), []).append(sample)
        result = []
        for (planner, sla), samples in cells.items():
            ok = [s for s in samples if s.status == RunStatus.SUCCEEDED]
            errors = [e for s in ok if (e := s.prediction_error) is not None]
            within = [w for s in ok if (w := s.within_prediction) is not None]
            result.append(
                Summary(
                    planner=planner,
                    sla=sla,
                    runs=len(samples),
                    failed=len(samples) - len(ok),
                    median_makespan_s=_median([s.makespan_s for s in ok]),
                    median_gb_s=_median([s.gb_s for s in ok]),
                    median_unused_gb_s=_median([s.unused_gb_s for s in ok]),
                    workers_cold=sum(s.workers_cold for s in ok),
                    workers_warm=sum(s.workers_warm for s in ok),
                    median_prediction_error=_median(errors),
                    sla_attainment=sum(within) / len(within) if within else None,
                    workers_prewarmed=sum(s.workers_prewarmed for s in ok),
                    tasks_duplicated=sum(s.tasks_duplicated for s in ok),
                    median_optimizations={
                        name: statistics.median(s.optimizations.get(name, 0) for s in samples)
                        for name in sorted({n for s in samples for n in s.optimizations})
                    },
                )
            )
        return result

    def to_dict(self) -> dict:
        return {
            "samples": [asdict(s) for s in self.samples],
            "summaries": [asdict(s) for s in self.summaries()],
        }


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def check_matrix(planners: list[str], slas: list[str]) -> tuple[list[str], list[str]]:
    """Validate the matrix up front, so a typo fails before any run."""
    checked = []
    for name in planners:
        checked.append(check_planner(name))
    if not checked:
        raise InvalidOption(f"No planners given: choose from {', '.join(PLANNER_NAMES)}")
    normalized = [parse_sla(s) for s in slas]
    if not normalized:
        raise InvalidOption("No SLAs given: e.g. avg,p90,p95,p99")
    return checked, normalized


def run_experiment(
    build: Callable[[], Workflow],
    runtime,
    planners: list[str],
    slas: list[str],
    repeat: int,
    *,
    classes=None,
    cold: bool = False,
    on_sample: Callable[[Sample], None] | None = None,
    verify: Callable[[Any], None] | None = None,
) -> Experiment:
    """Run every (planner, SLA) ``repeat`` times, interleaved so drift affects all alike.

    ``build`` is called for each run (a fresh Workflow: a build may draw random inputs).
    ``cold``: stop every idle worker before each run, so each run starts cold.
    ``verify``: called with the outputs of each succeeded run; what it raises is kept in
    the sample's ``verify_error``.
    At the end each sample's ``unused_gb_s`` is read back from the history: workers created
    for a run that never served charge it when they exit (with ``cold``, at the next cool-down;
    else after their idle timeout, which may be after the experiment).
    """
    planners, slas = check_matrix(planners, slas)
    if repeat < 1:
        raise InvalidOption(f"repeat={repeat} must be >= 1")
    experiment = Experiment()
    for index in range(repeat):
        for planner in planners:
            for sla in slas:
                if cold:
                    runtime.cool_down()
                wf = build()
                verify_error = ""
                try:
                    outputs = wf.run(planner, sla, classes, runtime=runtime)
                except TaskFailed:  # a failed run is a sample too
                    pass
                else:
                    if verify is not None:
                        try:
                            verify(outputs)
                        except Exception as exc:  # kept with the sample, reported by the caller
                            verify_error = f"{type(exc).__name__}: {exc}"
                record = wf.last_run.record
                sample = Sample(
                    planner=planner,
                    sla=sla,
                    repeat=index,
                    run_id=record.run_id,
                    status=record.status,
                    makespan_s=record.makespan_s or 0.0,
                    predicted_makespan_s=record.predicted_makespan_s,
                    gb_s=record.gb_s,
                    workers_cold=record.workers_cold,
                    workers_warm=record.workers_warm,
                    workers_prewarmed=record.workers_prewarmed,
                    tasks_duplicated=record.tasks_duplicated,
                    optimizations=wf.last_plan.optimization_counts() if wf.last_plan else {},
                    verify_error=verify_error,
                )
                experiment.samples.append(sample)
                if on_sample:
                    on_sample(sample)
    if cold:
        runtime.cool_down()  # the last run's unused workers exit and charge it now
    for sample in experiment.samples:
        late = runtime.run_record(sample.run_id)
        if late is not None:
            sample.unused_gb_s = late.prewarm_wasted_gb_s + late.workers_unused_gb_s
    return experiment
