"""Run history folded into metric values: records in, running totals out.

No Redis and no ``prometheus_client`` here, so what each metric counts can be checked on
records built by hand. The collector (:mod:`dagkube.metrics.exporter`) reads the records
and exposes :class:`Totals`; the names, labels and buckets come from the catalogue
(:mod:`dagkube.metrics.catalogue`).
"""

from __future__ import annotations

import bisect
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from dagkube.metrics.catalogue import HISTORY_SPECS, LabelValues
from dagkube.planning.rules import charged_from
from dagkube.resources import format_memory
from dagkube.store.records import RunRecord, RunStatus, TaskRecord, WorkerRecord

START_KINDS = ("cold", "warm", "prewarmed")


def start_kind(worker: WorkerRecord) -> str:
    """How a worker started on its invocation: pre-warmed (created ahead of the demand by a
    pre-warm request), cold (spawned for this demand) or warm (it was idle already)."""
    return "prewarmed" if worker.prewarmed else "cold" if worker.cold else "warm"


def plan_marks(plan_json: bytes | None) -> dict[str, int]:
    """Optimization marks per name in a stored plan (an unreadable plan has none)."""
    counts: dict[str, int] = defaultdict(int)
    if not plan_json:
        return counts
    try:
        tasks = json.loads(plan_json).get("tasks") or {}
    except ValueError:
        return counts
    for task in tasks.values():
        for mark in task.get("optimizations") or ():
            counts[str(mark.get("name"))] += 1
    return counts


@dataclass
class Histogram:
    """Observations per label set: a count per bucket (the last one +Inf, not cumulative)
    and the sum."""

    buckets: Sequence[float]
    counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    sums: dict[LabelValues, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, labels: LabelValues, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1  # le: upper bounds inclusive
        self.sums[labels] += value


class Totals:
    """Running totals over every run folded in so far (counts only grow): a counter value or
    a histogram per metric of ``HISTORY_SPECS`` and label set."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[LabelValues, float]] = {
            s.name: defaultdict(float) for s in HISTORY_SPECS if s.kind == "counter"
        }
        self.histograms: dict[str, Histogram] = {
            s.name: Histogram(s.buckets) for s in HISTORY_SPECS if s.kind == "histogram"
        }

    def add(self, name: str, labels: LabelValues, value: float = 1.0) -> None:
        self.counters[name][labels] += value

    def count(self, name: str, labels: LabelValues, value: str, values: Sequence[str]) -> None:
        """Count one ``value`` of the last label, starting its siblings at zero: a ratio
        such as met / all then exists for every label set, also at 0."""
        for other in values:
            self.counters[name][(*labels, other)] += 1.0 if other == value else 0.0

    def observe(self, name: str, labels: LabelValues, value: float) -> None:
        self.histograms[name].observe(labels, max(0.0, value))

    def fold(
        self,
        run: RunRecord,
        tasks: list[TaskRecord],
        workers: list[WorkerRecord],
        marks: dict[str, int],
    ) -> None:
        """Add one finished run: its record, its tasks' and workers' records, and the marks
        of each optimization in its plan (:func:`plan_marks`)."""
        planner = run.planner_label
        rl = (run.workflow, planner, run.sla)
        self._fold_run(run, rl, tasks, marks)
        self._fold_tasks(run, planner, tasks)
        self._fold_workers(planner, workers)

    def _fold_run(
        self, run: RunRecord, rl: LabelValues, tasks: list[TaskRecord], marks: dict[str, int]
    ) -> None:
        planner = rl[1]
        self.count(
            "dagkube_runs",
            rl,
            run.status,
            sorted({RunStatus.SUCCEEDED, RunStatus.FAILED, run.status}),
        )
        if run.predicted_makespan_s:
            self.observe("dagkube_run_predicted_makespan_seconds", rl, run.predicted_makespan_s)
        if run.status == RunStatus.SUCCEEDED and run.makespan_s is not None:
            self.observe("dagkube_run_makespan_seconds", rl, run.makespan_s)
            self.observe(
                "dagkube_run_execution_seconds", rl, sum(t.ended_at - t.started_at for t in tasks)
            )
            if run.predicted_makespan_s and run.makespan_s > 0:
                error = abs(run.predicted_makespan_s - run.makespan_s) / run.makespan_s
                self.observe("dagkube_run_prediction_error_ratio", rl, error)
                met = run.makespan_s <= run.predicted_makespan_s
                self.count("dagkube_run_sla", rl, "met" if met else "missed", ("met", "missed"))
        self.observe("dagkube_run_gigabyte_seconds", rl, run.gb_s)
        for name, value in (
            ("dagkube_prewarm_requests", run.prewarm_requested),
            ("dagkube_prewarm_started", run.prewarm_started),
            ("dagkube_prewarm_used", run.workers_prewarmed),
            ("dagkube_prewarm_wasted", run.prewarm_wasted),
            ("dagkube_prewarm_wasted_gigabyte_seconds", run.prewarm_wasted_gb_s),
            ("dagkube_workers_unused", run.workers_unused),
            ("dagkube_workers_unused_gigabyte_seconds", run.workers_unused_gb_s),
            ("dagkube_tasks_duplicated", run.tasks_duplicated),
            ("dagkube_duplicates_won", run.duplicates_won),
            ("dagkube_tasks_stolen", run.tasks_stolen),
            ("dagkube_workers_oom_killed", run.oom_kills),
            ("dagkube_oom_escalations", run.escalations),
        ):
            self.add(name, rl, value)
        for optimization in run.optimizations:
            self.add("dagkube_optimizations_applied", (planner, optimization))
            self.observe(
                "dagkube_run_optimization_marks",
                (run.workflow, planner, optimization),
                marks.get(optimization, 0),
            )

    def _fold_tasks(self, run: RunRecord, planner: str, tasks: list[TaskRecord]) -> None:
        rl = (run.workflow, planner, run.sla)
        originals = {t.task_id: t for t in tasks if not t.duplicate}
        saved = 0.0
        for task in tasks:
            tl = (run.workflow, planner, task.function)
            self._fold_task(planner, tl, task)
            if task.duplicate:
                original = originals.get(task.task_id)
                if original is not None and original.error is None:
                    saved += max(0.0, original.ended_at - task.ended_at)
            if task.prewarm_at is not None:
                for target_id in task.prewarm_targets:
                    target = originals.get(target_id)
                    if target is None:
                        continue
                    lead = target.started_at - task.prewarm_at
                    outcome = "ahead" if lead >= 0 else "late"
                    self.count("dagkube_prewarm_targets", (planner,), outcome, ("ahead", "late"))
                    if lead >= 0:
                        self.observe("dagkube_prewarm_trigger_to_start_seconds", (planner,), lead)
        self.add("dagkube_taskdup_saved_seconds", rl, saved)

    def _fold_task(self, planner: str, tl: LabelValues, task: TaskRecord) -> None:
        """What one task's record adds on its own (no other task of the run needed)."""
        self.add("dagkube_task_failures", tl, 1 if task.error is not None else 0)
        self.add("dagkube_task_retries", tl, task.retries)
        self.add("dagkube_task_oom_kills", tl, len(task.oom_attempts))
        if task.peak_memory_bytes is not None:
            self.observe("dagkube_task_peak_memory_bytes", tl, task.peak_memory_bytes)
        self.observe("dagkube_task_duration_seconds", tl, task.ended_at - task.started_at)
        self.observe("dagkube_task_input_wait_seconds", tl, task.input_wait_s)
        if task.download_bytes or task.download_s:
            self.observe("dagkube_task_download_seconds", tl, task.download_s)
            self.add("dagkube_task_download_bytes", tl, task.download_bytes)
        if task.output_stored:
            self.observe("dagkube_task_upload_seconds", tl, task.upload_s)
            self.add("dagkube_task_upload_bytes", tl, task.output_bytes)
        if task.preloaded:
            self.add("dagkube_preloaded_inputs", tl, len(task.preloaded))
            self.add("dagkube_preload_saved_seconds", tl, task.preload_s)
        if task.delayed_io is not None:
            self.count(
                "dagkube_delayed_io_outputs", (planner,), task.delayed_io, ("kept", "uploaded")
            )

    def _fold_workers(self, planner: str, workers: list[WorkerRecord]) -> None:
        for worker in workers:
            wl = (planner, format_memory(worker.memory_mib))
            gb = worker.memory_mib / 1024
            if worker.outcome == "lost":
                self.add("dagkube_workers_lost", wl)
                if worker.spawned_at is not None:
                    self.add(
                        "dagkube_gigabyte_seconds",
                        wl,
                        max(0.0, worker.finished_at - worker.spawned_at) * gb,
                    )
                continue
            start = start_kind(worker)
            self.count("dagkube_worker_starts", wl, start, START_KINDS)
            if worker.startup_s is not None:
                self.observe("dagkube_worker_startup_seconds", (*wl, start), worker.startup_s)
            if worker.prewarmed and worker.registered_at and worker.ready_at:
                lead = worker.ready_at - worker.registered_at
                self.observe("dagkube_prewarm_lead_seconds", wl, lead)
            # The period the worker charged the run, by the rule the worker followed.
            held_from = charged_from(
                cold=worker.cold,
                prewarmed=worker.prewarmed,
                spawned_s=worker.spawned_at or None,
                taken_s=worker.ready_at or worker.finished_at,
            )
            held_s = max(0.0, worker.finished_at - held_from)
            self.add("dagkube_gigabyte_seconds", wl, held_s * gb)
            self.add("dagkube_cpu_seconds_allocated", wl, held_s * worker.cpu)
            self.add("dagkube_cpu_seconds_used", wl, worker.cpu_s_used)
