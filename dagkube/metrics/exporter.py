"""Prometheus metrics from the run history in Redis (and the live state of worker pools).

One exporter for every process that exposes metrics: ``dagkube metrics serve`` (a Redis's
history), ``dagkube run --metrics-port`` and the operator's ``/metrics``. It is a custom
``prometheus_client`` collector: each scrape

* reads the ``dk:hist:all`` index (newest first, at most ``index_window`` ids) and folds only
  the runs it has not seen yet into running totals and cumulative histograms (a finished
  run's records never change: the run is finalized after its last worker, including a
  duplicated task's original, has written its records; the pre-warm counters that a late
  request or an unused pre-warmed worker adds afterwards are re-read while the run settles,
  see ``LATE_FIELDS``). The work per scrape is bounded (runs, records and seconds); what is
  left is folded by the next scrapes and reported as ``dagkube_exporter_runs_backlog``.
  Nothing scans the keyspace;
* reads the live state of the worker pools it was told about: queue depth per class and
  workers by state (see :meth:`RunHistoryCollector._live` for how states are derived).

Labels are bounded: workflow name, planner (as run: ``uniform`` or ``uniform + preload`` when
optimizations were switched on by hand; ``-opt`` planners keep their name), SLA, memory class,
function, status, start kind, optimization name, outcome, state. Never run, task or worker ids.
docs/metrics.md lists every metric and defines the derived ones.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError

from dagkube.metrics.records import RunRecord, TaskRecord, WorkerRecord
from dagkube.resources import format_memory
from dagkube.runtime.keys import PoolKeys, hist_all_runs, hist_run, namespace_of

log = logging.getLogger("dagkube.metrics")

# Buckets (upper bounds; +Inf is added).
SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
MAKESPAN = (0.5, 1, 1.5, 2, 3, 4, 5, 7.5, 10, 15, 20, 30, 45, 60, 120, 300, 600, 1800, 3600)
RATIOS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 2, 5)
GB_SECONDS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 1000, 10_000, 100_000)
COUNTS = (0, 1, 2, 3, 4, 5, 7, 10, 15, 20, 30, 50, 100, 250, 1000)
# Powers of two from 64 MiB to 16 GiB: the bounds fall on the usual memory classes, so a
# bucket reads "fits in a class of this size".
MEMORY_BYTES = tuple(float(2**power * 1024 * 1024) for power in range(6, 15))  # 64Mi..16Gi

# Work per scrape: what is left waits for the next scrape (dagkube_exporter_runs_backlog).
INDEX_WINDOW = 2000  # how far down the run index a scrape looks for runs it has not seen
MAX_RUNS_PER_SCRAPE = 200
MAX_RECORDS_PER_SCRAPE = 50_000  # task + worker records parsed
MAX_FOLD_SECONDS = 5.0
CHUNK = 25  # runs per Redis round trip
# Counters a run's history meta may still receive after the run ended: a pre-warm request
# due late, a worker created for the run that exits unused (a pre-warmed one, or one created
# for an invocation another worker took first). Finished runs are re-read for these fields
# (one HMGET each) until SETTLE_S after they finished.
LATE_FIELDS = {
    "prewarm_requested": "dagkube_prewarm_requests",
    "prewarm_started": "dagkube_prewarm_started",
    "prewarm_wasted": "dagkube_prewarm_wasted",
    "prewarm_wasted_gb_s": "dagkube_prewarm_wasted_gigabyte_seconds",
    "workers_unused": "dagkube_workers_unused",
    "workers_unused_gb_s": "dagkube_workers_unused_gigabyte_seconds",
}
SETTLE_S = 900.0
MAX_SETTLING_RUNS = 2000

LabelValues = tuple[str, ...]
Kind = Literal["counter", "histogram", "gauge"]


@dataclass(frozen=True)
class Spec:
    name: str  # without the _total of counters
    kind: Kind
    doc: str
    labels: tuple[str, ...]
    buckets: Sequence[float] = ()

    def exposed(self) -> set[str]:
        """Sample names in the exposition."""
        if self.kind == "counter":
            return {f"{self.name}_total"}
        if self.kind == "histogram":
            return {f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count"}
        return {self.name}


RUN = ("workflow", "planner", "sla")
TASK = ("workflow", "planner", "function")
WORKER = ("planner", "memory_class")

HISTORY_SPECS: tuple[Spec, ...] = (
    # runs
    Spec("dagkube_runs", "counter", "Finished runs by status", (*RUN, "status")),
    Spec(
        "dagkube_run_makespan_seconds",
        "histogram",
        "Measured makespan of succeeded runs (submission to last task completed)",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_predicted_makespan_seconds",
        "histogram",
        "Makespan the plan predicted at the run's SLA",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_prediction_error_ratio",
        "histogram",
        "Absolute difference of predicted and measured makespan over measured (succeeded runs)",
        RUN,
        RATIOS,
    ),
    Spec(
        "dagkube_run_sla",
        "counter",
        "Succeeded runs that finished within (met) or after (missed) their predicted makespan",
        (*RUN, "outcome"),
    ),
    Spec(
        "dagkube_run_execution_seconds",
        "histogram",
        "Sum of the execution times of a succeeded run's tasks (duplicates included)",
        RUN,
        MAKESPAN,
    ),
    Spec(
        "dagkube_run_gigabyte_seconds",
        "histogram",
        "Memory held by a run's workers, GB x seconds per run",
        RUN,
        GB_SECONDS,
    ),
    # tasks
    Spec(
        "dagkube_task_duration_seconds",
        "histogram",
        "Execution time of tasks (last attempt; duplicates included)",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_input_wait_seconds",
        "histogram",
        "From a task taken by its worker to its inputs in hand",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_download_seconds",
        "histogram",
        "Time tasks that downloaded inputs spent downloading them",
        TASK,
        SECONDS,
    ),
    Spec(
        "dagkube_task_upload_seconds",
        "histogram",
        "Time tasks that stored their output spent uploading it",
        TASK,
        SECONDS,
    ),
    Spec("dagkube_task_download_bytes", "counter", "Input bytes tasks downloaded", TASK),
    Spec("dagkube_task_upload_bytes", "counter", "Output bytes tasks stored", TASK),
    Spec("dagkube_task_failures", "counter", "Tasks that raised after their retries", TASK),
    Spec("dagkube_task_retries", "counter", "Task attempts beyond the first", TASK),
    Spec(
        "dagkube_task_peak_memory_bytes",
        "histogram",
        "Peak resident memory of the worker process while a task ran (tasks where measured)",
        TASK,
        MEMORY_BYTES,
    ),
    Spec(
        "dagkube_task_oom_kills",
        "counter",
        "Earlier attempts of tasks whose worker was OOM-killed (the task then ran one class up)",
        TASK,
    ),
    # workers
    Spec(
        "dagkube_worker_starts",
        "counter",
        "Invocations served, by how their worker started: cold, warm, prewarmed",
        (*WORKER, "start"),
    ),
    Spec(
        "dagkube_worker_startup_seconds",
        "histogram",
        "From an invocation queued to its first task started",
        (*WORKER, "start"),
        SECONDS,
    ),
    Spec("dagkube_workers_lost", "counter", "Workers lost mid-invocation (work re-queued)", WORKER),
    Spec(
        "dagkube_workers_unused",
        "counter",
        "Workers created for a run's queued invocation that another worker took first, and "
        "that exited without serving anything",
        RUN,
    ),
    Spec(
        "dagkube_workers_unused_gigabyte_seconds",
        "counter",
        "Lifetime of those unused workers, GB x seconds (charged to the run, not in its GB-s)",
        RUN,
    ),
    Spec(
        "dagkube_workers_oom_killed",
        "counter",
        "Workers killed for exceeding their class's memory limit (runs with enforced limits)",
        RUN,
    ),
    Spec(
        "dagkube_oom_escalations",
        "counter",
        "Work of OOM-killed workers re-queued one memory class up (at the largest class the "
        "run fails instead)",
        RUN,
    ),
    # resources
    Spec(
        "dagkube_gigabyte_seconds",
        "counter",
        "Memory held by workers for runs, GB x seconds (from spawn for cold and pre-warmed "
        "starts, else from taking the invocation, to its end)",
        WORKER,
    ),
    Spec(
        "dagkube_cpu_seconds_allocated",
        "counter",
        "CPU held by workers for runs, allocated CPUs x seconds (same periods as GB-seconds)",
        WORKER,
    ),
    Spec("dagkube_cpu_seconds_used", "counter", "CPU time workers used for runs", WORKER),
    # optimizations
    Spec(
        "dagkube_optimizations_applied",
        "counter",
        "Runs with each optimization switched on in their plan",
        ("planner", "optimization"),
    ),
    Spec(
        "dagkube_run_optimization_marks",
        "histogram",
        "Marks of an optimization in a run's plan, per run that switched it on",
        ("workflow", "planner", "optimization"),
        COUNTS,
    ),
    Spec("dagkube_prewarm_requests", "counter", "Workers asked for by pre-warm requests", RUN),
    Spec(
        "dagkube_prewarm_started",
        "counter",
        "Pre-warm workers the scaler created (within the worker cap)",
        RUN,
    ),
    Spec("dagkube_prewarm_used", "counter", "Pre-warmed workers that served their run", RUN),
    Spec("dagkube_prewarm_wasted", "counter", "Pre-warmed workers that exited unused", RUN),
    Spec(
        "dagkube_prewarm_wasted_gigabyte_seconds",
        "counter",
        "Lifetime of pre-warmed workers that exited unused, GB x seconds",
        RUN,
    ),
    Spec(
        "dagkube_prewarm_lead_seconds",
        "histogram",
        "From a pre-warmed worker ready (registered) to taking the invocation it served",
        WORKER,
        SECONDS,
    ),
    Spec(
        "dagkube_prewarm_trigger_to_start_seconds",
        "histogram",
        "From a pre-warm request due to its target task's start (targets started after it)",
        ("planner",),
        SECONDS,
    ),
    Spec(
        "dagkube_prewarm_targets",
        "counter",
        "Target tasks of pre-warm requests that started after (ahead) or before (late) the "
        "request was due",
        ("planner", "outcome"),
    ),
    Spec(
        "dagkube_preloaded_inputs",
        "counter",
        "Inputs fetched in the background before their fan-in task started (preload)",
        TASK,
    ),
    Spec(
        "dagkube_preload_saved_seconds",
        "counter",
        "Background fetch and deserialize time of pre-loaded inputs: input-wait moved off the "
        "task (an upper bound of the wait saved)",
        TASK,
    ),
    Spec(
        "dagkube_tasks_duplicated",
        "counter",
        "Duplicates of late upstream tasks started by a waiting worker (taskdup)",
        RUN,
    ),
    Spec("dagkube_duplicates_won", "counter", "Duplicates that finished before the original", RUN),
    Spec(
        "dagkube_taskdup_saved_seconds",
        "counter",
        "Original's end minus its duplicate's end, where both finished and the duplicate was "
        "first: how much sooner consumers had the output",
        RUN,
    ),
    Spec(
        "dagkube_delayed_io_outputs",
        "counter",
        "Outputs under delayed I/O: kept local (upload skipped) or uploaded",
        ("planner", "outcome"),
    ),
)

LIVE_SPECS: tuple[Spec, ...] = (
    Spec(
        "dagkube_queue_depth",
        "gauge",
        "Invocations queued for a worker, by class (live pools)",
        ("memory_class",),
    ),
    Spec(
        "dagkube_workers",
        "gauge",
        "Workers by state (live pools): starting, idle, busy, waiting (bound, blocked on inputs)",
        ("state", "memory_class"),
    ),
    Spec("dagkube_exporter_redis_up", "gauge", "1 if the last scrape could read Redis", ()),
    Spec(
        "dagkube_exporter_runs_backlog",
        "gauge",
        "Runs in the history index not folded yet (left for the next scrapes)",
        (),
    ),
    Spec(
        "dagkube_exporter_runs_folded",
        "counter",
        "Runs of the history folded into these metrics since the exporter started",
        (),
    ),
)

SPECS = {spec.name: spec for spec in (*HISTORY_SPECS, *LIVE_SPECS)}
ALLOWED_LABELS = frozenset(label for spec in SPECS.values() for label in spec.labels)
WORKER_STATES = ("starting", "idle", "busy", "waiting")


def exposed_names() -> set[str]:
    """Every sample name the exporter can expose (dashboards may only use these)."""
    return {name for spec in SPECS.values() for name in spec.exposed()}


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    sums: dict[LabelValues, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, labels: LabelValues, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1  # le: upper bounds inclusive
        self.sums[labels] += value

    def family(self, spec: Spec, born: Callable[[LabelValues], bool]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
        bounds = [floatToGoString(b) for b in spec.buckets] + ["+Inf"]
        for labels, counts in sorted(self.counts.items()):
            if not born(labels):
                family.add_metric(list(labels), [(b, 0) for b in bounds], 0.0)
                continue
            cumulative, running = [], 0
            for bound, count in zip(bounds, counts, strict=True):
                running += count
                cumulative.append((bound, running))
            family.add_metric(list(labels), cumulative, self.sums[labels])
        return family


def _marks(plan_json: bytes | None) -> dict[str, int]:
    """Optimization marks per name in a stored plan."""
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


class _Totals:
    """Running totals over every run folded in so far (counts only grow).

    A label set that appears after the first exposition is exposed at zero once before its
    values: Prometheus then sees it go from 0 to its first runs, and ``rate()``/``increase()``
    count them (a series born at 1 would hide its first run from every rate).
    """

    def __init__(self) -> None:
        self._exposed: set[tuple[str, LabelValues]] = set()
        self._first = True
        self.counters: dict[str, dict[LabelValues, float]] = {
            s.name: defaultdict(float) for s in HISTORY_SPECS if s.kind == "counter"
        }
        self.histograms: dict[str, _Histogram] = {
            s.name: _Histogram(s.buckets) for s in HISTORY_SPECS if s.kind == "histogram"
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
        planner = run.planner_label
        rl = (run.workflow, planner, run.sla)
        self._fold_run(run, rl, tasks, marks)
        self._fold_tasks(run, planner, tasks)
        self._fold_workers(planner, workers)

    def _fold_run(
        self, run: RunRecord, rl: LabelValues, tasks: list[TaskRecord], marks: dict[str, int]
    ) -> None:
        planner = rl[1]
        self.count("dagkube_runs", rl, run.status, sorted({"succeeded", "failed", run.status}))
        if run.predicted_makespan_s:
            self.observe("dagkube_run_predicted_makespan_seconds", rl, run.predicted_makespan_s)
        if run.status == "succeeded" and run.makespan_s is not None:
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
            start = "prewarmed" if worker.prewarmed else "cold" if worker.cold else "warm"
            self.count("dagkube_worker_starts", wl, start, ("cold", "warm", "prewarmed"))
            if worker.startup_s is not None:
                self.observe("dagkube_worker_startup_seconds", (*wl, start), worker.startup_s)
            if worker.prewarmed and worker.registered_at and worker.ready_at:
                lead = worker.ready_at - worker.registered_at
                self.observe("dagkube_prewarm_lead_seconds", wl, lead)
            # The periods the worker charged the run (dagkube/runtime/worker.py, _serve).
            held_from = (
                worker.spawned_at
                if (worker.cold or worker.prewarmed) and worker.spawned_at
                else worker.ready_at or worker.finished_at
            )
            held_s = max(0.0, worker.finished_at - held_from)
            self.add("dagkube_gigabyte_seconds", wl, held_s * gb)
            self.add("dagkube_cpu_seconds_allocated", wl, held_s * worker.cpu)
            self.add("dagkube_cpu_seconds_used", wl, worker.cpu_s_used)

    def families(self) -> Iterator[Metric]:
        first, self._first = self._first, False  # the history before the first exposition

        def born(name: str) -> Callable[[LabelValues], bool]:
            def check(labels: LabelValues) -> bool:
                if (name, labels) in self._exposed:
                    return True
                self._exposed.add((name, labels))
                return first

            return check

        for spec in HISTORY_SPECS:
            if spec.kind == "histogram":
                yield self.histograms[spec.name].family(spec, born(spec.name))
                continue
            family = CounterMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
            shown = born(spec.name)
            for values, total in sorted(self.counters[spec.name].items()):
                family.add_metric(list(values), total if shown(values) else 0.0)
            yield family


Pools = Iterable[str] | Callable[[], Iterable[str]]


class RunHistoryCollector(Collector):
    """A prometheus_client collector over a Redis's run history.

    ``redis``: a Redis URL or a *sync* client (scrapes run on the HTTP server's threads).
    ``pools``: worker pools (names, or a callable returning the current ones) whose live
    state to report; none: no live metrics. ``workers_alive``: a callable returning the
    handles (``worker_id``, ``memory_mib``) of the workers the pools' backends created and
    know alive; without it the ``starting`` state is not reported (only the backend knows a
    worker that has not registered in Redis yet). ``namespaces``: Kubernetes namespaces (or a
    callable returning them) whose histories to fold besides the local one (each namespace
    has its own, docs/architecture.md "Key space and Redis users"); one left out for a while
    is folded on from where it was when it comes back.
    """

    def __init__(
        self,
        redis: Any,
        pools: Pools = (),
        *,
        workers_alive: Callable[[], Iterable[Any]] | None = None,
        namespaces: Pools = (),
        index_window: int = INDEX_WINDOW,
        max_runs_per_scrape: int = MAX_RUNS_PER_SCRAPE,
        max_records_per_scrape: int = MAX_RECORDS_PER_SCRAPE,
        max_fold_seconds: float = MAX_FOLD_SECONDS,
    ) -> None:
        if isinstance(redis, str):
            from dagkube.runtime.connection import sync_client

            redis = sync_client(redis)
        self.redis = redis
        self._pools = pools if callable(pools) else list(pools)
        self.workers_alive = workers_alive
        self._namespaces = namespaces if callable(namespaces) else list(namespaces)
        self.index_window = index_window
        self.max_runs_per_scrape = max_runs_per_scrape
        self.max_records_per_scrape = max_records_per_scrape
        self.max_fold_seconds = max_fold_seconds
        self._seen: dict[str | None, set[str]] = {}  # per namespace (None: local runs)
        self._totals = _Totals()
        self._backlog = 0
        self._folded = 0
        # run id -> (labels, late fields as last folded, re-read until): recently finished runs
        self._settling: dict[str, tuple[LabelValues, dict[str, float], float]] = {}
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: registering must not read Redis

    def pools(self) -> list[str]:
        return list(self._pools() if callable(self._pools) else self._pools)

    def namespaces(self) -> list[str | None]:
        """The histories folded: the local one, then each namespace's."""
        named = self._namespaces() if callable(self._namespaces) else self._namespaces
        return [None, *dict.fromkeys(named)]

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            up = 1
            try:
                self._fold_new_runs()
                live = list(self._live())
            except (RedisError, OSError) as exc:  # Redis away: serve what is folded, say so
                log.warning("metrics: cannot read Redis: %s: %s", type(exc).__name__, exc)
                up, live = 0, []
            yield from self._totals.families()
            yield from live
            for name, value in (
                ("dagkube_exporter_redis_up", up),
                ("dagkube_exporter_runs_backlog", self._backlog),
            ):
                gauge = GaugeMetricFamily(name, SPECS[name].doc)
                gauge.add_metric([], value)
                yield gauge
            folded = CounterMetricFamily(
                "dagkube_exporter_runs_folded", SPECS["dagkube_exporter_runs_folded"].doc
            )
            folded.add_metric([], self._folded)
            yield folded

    # ------------------------------------------------------------------ history
    def _fold_new_runs(self) -> None:
        self._settle()
        namespaces = self.namespaces()
        pipe = self.redis.pipeline(transaction=False)
        for namespace in namespaces:
            pipe.lrange(hist_all_runs(namespace), 0, self.index_window - 1)
        new: list[str] = []
        for namespace, listed in zip(namespaces, pipe.execute(), strict=True):
            window = [i.decode() for i in listed]
            # Ids only move down an index (LPUSH, LTRIM): one that left its window never returns.
            seen = self._seen.setdefault(namespace, set())
            seen.intersection_update(window)
            new += [run_id for run_id in window if run_id not in seen]  # newest first
        began, runs, records = time.monotonic(), 0, 0
        while new:
            if (
                runs >= self.max_runs_per_scrape
                or records >= self.max_records_per_scrape
                or time.monotonic() - began > self.max_fold_seconds
            ):
                break
            size = min(CHUNK, self.max_runs_per_scrape - runs)
            chunk, new = new[:size], new[size:]
            records += self._fold_chunk(chunk)
            runs += len(chunk)
        self._backlog = len(new)

    def _settle(self) -> None:
        """Fold what the late fields of recently finished runs gained since."""
        if not self._settling:
            return
        ids = list(self._settling)
        pipe = self.redis.pipeline(transaction=False)
        for run_id in ids:
            pipe.hmget(hist_run(run_id, "meta"), list(LATE_FIELDS))
        now = time.time()
        for run_id, values in zip(ids, pipe.execute(), strict=True):
            labels, known, until = self._settling[run_id]
            for (field_name, metric), raw in zip(LATE_FIELDS.items(), values, strict=True):
                value = float(raw or 0)
                if value > known[field_name]:
                    self._totals.add(metric, labels, value - known[field_name])
                    known[field_name] = value
            if now > until or all(v is None for v in values):  # settled, or trimmed
                del self._settling[run_id]

    def _fold_chunk(self, run_ids: list[str]) -> int:
        """Fold these runs; returns how many records were parsed."""
        pipe = self.redis.pipeline(transaction=False)
        for run_id in run_ids:
            pipe.hgetall(hist_run(run_id, "meta"))
        metas = pipe.execute()
        runs: list[RunRecord] = []
        for run_id, meta in zip(run_ids, metas, strict=True):
            if not meta:  # its history was trimmed: nothing to fold
                continue
            try:
                runs.append(RunRecord.from_hash({k.decode(): v.decode() for k, v in meta.items()}))
            except ValueError as exc:  # a record this version cannot read: skip the run
                log.warning("metrics: skipping run %s: %s", run_id, exc)
        pipe = self.redis.pipeline(transaction=False)
        for run in runs:
            pipe.hvals(hist_run(run.run_id, "tasks"))
            pipe.hvals(hist_run(run.run_id, "workers"))
            if run.optimizations:
                pipe.get(hist_run(run.run_id, "plan"))
        answers = iter(pipe.execute())
        # Read in full: from here on folding does no I/O, so every run is folded (or skipped
        # as unreadable) exactly once. A Redis error above leaves them for the next scrape.
        for run_id in run_ids:
            self._seen.setdefault(namespace_of(run_id), set()).add(run_id)
        parsed = 0
        for run in runs:
            tasks, workers = next(answers), next(answers)
            marks = _marks(next(answers)) if run.optimizations else {}
            parsed += len(tasks) + len(workers)
            try:
                self._totals.fold(
                    run,
                    [TaskRecord.model_validate_json(t) for t in tasks],
                    [WorkerRecord.model_validate_json(w) for w in workers],
                    marks,
                )
            except ValueError as exc:  # a record this version cannot read: skip the run
                log.warning("metrics: skipping run %s: %s", run.run_id, exc)
                continue
            self._folded += 1
            ended = run.finished_at or run.submitted_at
            if time.time() < ended + SETTLE_S:
                if len(self._settling) >= MAX_SETTLING_RUNS:
                    del self._settling[next(iter(self._settling))]
                labels = (run.workflow, run.planner_label, run.sla)
                known = {f: float(getattr(run, f)) for f in LATE_FIELDS}
                self._settling[run.run_id] = (labels, known, ended + SETTLE_S)
        return parsed

    # ------------------------------------------------------------------ live pools
    def _live(self) -> Iterator[Metric]:
        """Queue depth by class and workers by state, summed over the pools (pool names are
        per process or per Workflow: not a label). A worker is

        * ``starting``: created by a backend (``workers_alive``) but not registered yet;
        * ``idle``: registered and in its class's idle set (waiting for an invocation);
        * ``waiting``: in the pool's waiting set: bound to a run, blocked on its inbox for
          the inputs of its next task (uses no CPU; the scaler does not count it);
        * ``busy``: registered and neither idle nor waiting (running an invocation).
        """
        pools = self.pools()
        if not pools:
            return
        depth: dict[int, int] = defaultdict(int)
        states: dict[tuple[str, int], int] = defaultdict(int)
        classes: set[int] = set()
        registered_ids: set[str] = set()
        for pool in pools:
            keys = PoolKeys(pool)
            pool_classes = sorted(int(c) for c in self.redis.smembers(keys.classes))
            pipe = self.redis.pipeline(transaction=False)
            for mib in pool_classes:
                pipe.llen(keys.queue(mib))
                pipe.smembers(keys.idle(mib))
            pipe.hgetall(keys.workers)
            pipe.smembers(keys.waiting)
            answers = pipe.execute()
            idle: set[bytes] = set()
            for index, mib in enumerate(pool_classes):
                depth[mib] += answers[2 * index]
                idle |= answers[2 * index + 1]
            registered, waiting = answers[-2], answers[-1]
            classes.update(pool_classes)
            for worker_id, mib_raw in registered.items():
                mib = int(mib_raw)
                classes.add(mib)
                registered_ids.add(worker_id.decode())
                state = (
                    "idle" if worker_id in idle else "waiting" if worker_id in waiting else "busy"
                )
                states[(state, mib)] += 1
        shown: tuple[str, ...] = WORKER_STATES
        if self.workers_alive is None:
            shown = tuple(s for s in WORKER_STATES if s != "starting")
        else:
            for handle in _snapshot(self.workers_alive):
                if handle.worker_id not in registered_ids:
                    classes.add(int(handle.memory_mib))
                    states[("starting", int(handle.memory_mib))] += 1
        spec = SPECS["dagkube_queue_depth"]
        queue = GaugeMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
        for mib in sorted(classes):
            queue.add_metric([format_memory(mib)], depth.get(mib, 0))
        yield queue
        spec = SPECS["dagkube_workers"]
        workers = GaugeMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
        for mib in sorted(classes):
            for state in shown:
                workers.add_metric([state, format_memory(mib)], states.get((state, mib), 0))
        yield workers


def _snapshot(source: Callable[[], Iterable[Any]]) -> list[Any]:
    """The backend's live workers, read from another thread: retry if its table changed
    while being read."""
    for _ in range(3):
        try:
            return list(source())
        except RuntimeError:  # dictionary changed size during iteration
            continue
    return []
