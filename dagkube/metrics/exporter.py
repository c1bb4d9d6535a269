"""Prometheus metrics from the run history in Redis (and the live state of worker pools).

One exporter for every process that exposes metrics: ``dagkube metrics serve`` (a Redis's
history), ``dagkube run --metrics-port`` and the operator's ``/metrics``. A scrape reads only
the runs it has not seen yet, newest first from the ``dk:hist:all`` index (a finished run's
records never change), folds them into running totals and histograms, and reads the queue
depth and workers of the pools it was told about. Nothing scans the keyspace.

Labels are bounded: workflow name, planner, SLA, memory class, function, status, start kind,
optimization name. Never run ids, task ids or worker ids.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from dagkube.metrics.records import RunRecord, TaskRecord, WorkerRecord
from dagkube.runtime.keys import HIST_ALL_RUNS, PoolKeys, hist_run

SECONDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600)
RATIOS = (0.01, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2)
MAX_NEW_RUNS_PER_SCRAPE = 500
INDEX_WINDOW = 2000  # how far down the run index a scrape looks for runs it has not seen

LabelValues = tuple[str, ...]


def memory_class(mib: int) -> str:
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


@dataclass
class _Histogram:
    buckets: Sequence[float]
    counts: dict[LabelValues, list[int]] = field(default_factory=dict)
    sums: dict[LabelValues, float] = field(default_factory=lambda: defaultdict(float))

    def observe(self, labels: LabelValues, value: float) -> None:
        counts = self.counts.setdefault(labels, [0] * (len(self.buckets) + 1))
        counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sums[labels] += value

    def family(self, name: str, doc: str, label_names: list[str]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=label_names)
        for labels, counts in sorted(self.counts.items()):
            cumulative, running = [], 0
            for bound, count in zip([*self.buckets, float("inf")], counts, strict=True):
                running += count
                cumulative.append(("+Inf" if bound == float("inf") else repr(bound), running))
            family.add_metric(list(labels), cumulative, self.sums[labels])
        return family


@dataclass(frozen=True)
class _Spec:
    name: str
    doc: str
    labels: tuple[str, ...]
    buckets: Sequence[float] | None = None  # a histogram when given, else a counter


RUN = ("workflow", "planner", "sla")
SPECS = {
    spec.name: spec
    for spec in (
        _Spec("dagkube_runs", "Finished runs, by status", (*RUN, "status")),
        _Spec("dagkube_run_makespan_seconds", "Measured makespan of succeeded runs", RUN, SECONDS),
        _Spec(
            "dagkube_run_predicted_makespan_seconds",
            "Makespan the plan predicted at the run's SLA",
            RUN,
            SECONDS,
        ),
        _Spec(
            "dagkube_run_prediction_error_ratio",
            "Absolute difference of predicted and measured makespan over measured (succeeded runs)",
            RUN,
            RATIOS,
        ),
        _Spec(
            "dagkube_run_sla",
            "Succeeded runs that finished within (met) or after (missed) their predicted makespan",
            (*RUN, "outcome"),
        ),
        _Spec(
            "dagkube_task_duration_seconds",
            "Execution time of tasks (last attempt)",
            ("workflow", "planner", "function"),
            SECONDS,
        ),
        _Spec(
            "dagkube_task_input_wait_seconds",
            "Time from a task's worker being ready to its inputs in hand",
            ("workflow", "planner", "function"),
            SECONDS,
        ),
        _Spec(
            "dagkube_task_download_seconds",
            "Time tasks spent downloading inputs",
            ("workflow", "planner", "function"),
            SECONDS,
        ),
        _Spec(
            "dagkube_task_upload_seconds",
            "Time tasks spent uploading outputs",
            ("workflow", "planner", "function"),
            SECONDS,
        ),
        _Spec(
            "dagkube_task_failures",
            "Tasks that raised after their retries",
            ("workflow", "function"),
        ),
        _Spec("dagkube_task_retries", "Task attempts beyond the first", ("workflow", "function")),
        _Spec(
            "dagkube_worker_starts",
            "Invocations served, by how their worker started (cold, warm, prewarmed)",
            ("planner", "memory_class", "start"),
        ),
        _Spec(
            "dagkube_worker_startup_seconds",
            "From an invocation queued to its first task started",
            ("memory_class", "start"),
            SECONDS,
        ),
        _Spec(
            "dagkube_workers_lost",
            "Workers lost mid-invocation (work re-queued)",
            ("memory_class",),
        ),
        _Spec("dagkube_prewarm_requests", "Workers asked for by pre-warm requests", RUN),
        _Spec("dagkube_prewarm_used", "Pre-warmed workers that served their run", RUN),
        _Spec("dagkube_prewarm_wasted", "Pre-warmed workers that exited unused", RUN),
        _Spec(
            "dagkube_prewarm_lead_seconds",
            "From a pre-warmed worker ready to the invocation it served",
            ("memory_class",),
            SECONDS,
        ),
        _Spec(
            "dagkube_preloaded_inputs",
            "Inputs fetched in the background (preload)",
            ("workflow", "function"),
        ),
        _Spec(
            "dagkube_preload_saved_seconds",
            "Background fetch time of pre-loaded inputs: input-wait the task did not spend",
            ("workflow", "function"),
        ),
        _Spec("dagkube_tasks_duplicated", "Late upstream tasks re-run by a waiting worker", RUN),
        _Spec("dagkube_duplicates_won", "Duplicates that finished before their original", RUN),
        _Spec(
            "dagkube_optimizations_applied",
            "Runs with each optimization switched on in their plan",
            ("planner", "optimization"),
        ),
        _Spec(
            "dagkube_gigabyte_seconds",
            "Memory held by workers, GB x seconds",
            ("planner", "memory_class"),
        ),
        _Spec(
            "dagkube_cpu_seconds_allocated",
            "CPU held by workers (allocated CPUs x seconds)",
            ("planner",),
        ),
        _Spec("dagkube_cpu_seconds_used", "CPU time workers used", ("planner",)),
    )
}
LIVE = {
    "dagkube_queue_depth": ("Invocations queued for a worker, by class", ("memory_class",)),
    "dagkube_workers": (
        "Registered workers by state: busy, idle, waiting (bound, blocked on inputs)",
        ("state",),
    ),
}
ALLOWED_LABELS = frozenset(label for spec in SPECS.values() for label in spec.labels) | frozenset(
    label for _, labels in LIVE.values() for label in labels
)


class _Totals:
    """Running totals over every run folded in so far."""

    def __init__(self) -> None:
        self.counters: dict[str, dict[LabelValues, float]] = {
            name: defaultdict(float) for name, spec in SPECS.items() if spec.buckets is None
        }
        self.histograms: dict[str, _Histogram] = {
            name: _Histogram(spec.buckets) for name, spec in SPECS.items() if spec.buckets
        }

    def add(self, name: str, labels: LabelValues, value: float = 1.0) -> None:
        self.counters[name][labels] += value

    def observe(self, name: str, labels: LabelValues, value: float) -> None:
        self.histograms[name].observe(labels, max(0.0, value))

    def fold(self, run: RunRecord, tasks: list[TaskRecord], workers: list[WorkerRecord]) -> None:
        rl = (run.workflow, run.planner, run.sla)
        self.add("dagkube_runs", (*rl, run.status))
        succeeded = run.status == "succeeded" and run.makespan_s is not None
        if run.predicted_makespan_s:
            self.observe("dagkube_run_predicted_makespan_seconds", rl, run.predicted_makespan_s)
        if succeeded:
            assert run.makespan_s is not None
            self.observe("dagkube_run_makespan_seconds", rl, run.makespan_s)
            if run.predicted_makespan_s and run.makespan_s > 0:
                error = abs(run.predicted_makespan_s - run.makespan_s) / run.makespan_s
                self.observe("dagkube_run_prediction_error_ratio", rl, error)
                met = run.makespan_s <= run.predicted_makespan_s
                self.add("dagkube_run_sla", (*rl, "met" if met else "missed"))
        for name, value in (
            ("dagkube_prewarm_requests", run.prewarm_requested),
            ("dagkube_prewarm_used", run.workers_prewarmed),
            ("dagkube_prewarm_wasted", run.prewarm_wasted),
            ("dagkube_tasks_duplicated", run.tasks_duplicated),
            ("dagkube_duplicates_won", run.duplicates_won),
        ):
            self.add(name, rl, value)
        for optimization in run.optimizations:
            self.add("dagkube_optimizations_applied", (run.planner, optimization))
        self.add("dagkube_cpu_seconds_allocated", (run.planner,), run.cpu_s_allocated)
        self.add("dagkube_cpu_seconds_used", (run.planner,), run.cpu_s_used)
        for task in tasks:
            tl = (run.workflow, task.function)
            tp = (run.workflow, run.planner, task.function)
            self.add("dagkube_task_failures", tl, 1 if task.error is not None else 0)
            self.add("dagkube_task_retries", tl, task.retries)
            self.observe("dagkube_task_duration_seconds", tp, task.ended_at - task.started_at)
            self.observe("dagkube_task_input_wait_seconds", tp, task.input_wait_s)
            if task.download_bytes or task.download_s:
                self.observe("dagkube_task_download_seconds", tp, task.download_s)
            if task.output_stored:
                self.observe("dagkube_task_upload_seconds", tp, task.upload_s)
            if task.preloaded:
                self.add("dagkube_preloaded_inputs", tl, len(task.preloaded))
                self.add("dagkube_preload_saved_seconds", tl, task.preload_s)
        for worker in workers:
            mc = memory_class(worker.memory_mib)
            if worker.outcome == "lost":
                self.add("dagkube_workers_lost", (mc,))
                continue
            start = "prewarmed" if worker.prewarmed else "cold" if worker.cold else "warm"
            self.add("dagkube_worker_starts", (run.planner, mc, start))
            if worker.startup_s is not None:
                self.observe("dagkube_worker_startup_seconds", (mc, start), worker.startup_s)
            if worker.prewarmed and worker.registered_at and worker.ready_at:
                lead = worker.ready_at - worker.registered_at
                self.observe("dagkube_prewarm_lead_seconds", (mc,), lead)
            held_from = (
                worker.spawned_at
                if (worker.cold or worker.prewarmed) and worker.spawned_at
                else worker.ready_at or worker.finished_at
            )
            held_s = max(0.0, worker.finished_at - held_from)
            self.add(
                "dagkube_gigabyte_seconds", (run.planner, mc), held_s * worker.memory_mib / 1024
            )

    def families(self) -> Iterator[Any]:
        for name, spec in SPECS.items():
            labels = list(spec.labels)
            if spec.buckets is not None:
                yield self.histograms[name].family(name, spec.doc, labels)
                continue
            family = CounterMetricFamily(name, spec.doc, labels=labels)
            for values, total in sorted(self.counters[name].items()):
                family.add_metric(list(values), total)
            yield family


class RunHistoryCollector(Collector):
    """A prometheus_client collector over a Redis's run history (a sync client: scrapes run
    on the HTTP server's thread). ``pools``: worker pools whose live state to report."""

    def __init__(self, redis: Any, pools: Iterable[str] = ()) -> None:
        self.redis = redis
        self.pools = list(pools)
        self._seen: set[str] = set()
        self._totals = _Totals()
        self._lock = threading.Lock()

    def describe(self) -> Iterable[Any]:
        return []  # dynamic: registering must not trigger a Redis read

    def collect(self) -> Iterable[Any]:
        with self._lock:
            self._fold_new_runs()
            yield from self._totals.families()
        yield from self._live()

    def _fold_new_runs(self) -> None:
        ids = [i.decode() for i in self.redis.lrange(HIST_ALL_RUNS, 0, INDEX_WINDOW - 1)]
        new = [i for i in ids if i not in self._seen][:MAX_NEW_RUNS_PER_SCRAPE]
        if not new:
            return
        pipe = self.redis.pipeline(transaction=False)
        for run_id in new:
            pipe.hgetall(hist_run(run_id, "meta"))
            pipe.hvals(hist_run(run_id, "tasks"))
            pipe.hvals(hist_run(run_id, "workers"))
        answers = pipe.execute()
        for index, run_id in enumerate(new):
            meta, tasks, workers = answers[3 * index : 3 * index + 3]
            self._seen.add(run_id)
            if not meta:
                continue
            run = RunRecord.from_hash({k.decode(): v.decode() for k, v in meta.items()})
            self._totals.fold(
                run,
                [TaskRecord.model_validate_json(t) for t in tasks],
                [WorkerRecord.model_validate_json(w) for w in workers],
            )

    def _live(self) -> Iterator[Any]:
        """Queue depth by class and workers by state, summed over the pools given (pool names
        are per process or per Workflow: not a label)."""
        depth_by_class: dict[int, int] = defaultdict(int)
        by_state = {"busy": 0, "idle": 0, "waiting": 0}
        for pool in self.pools:
            keys = PoolKeys(pool)
            classes = sorted(int(c) for c in self.redis.smembers(keys.classes))
            pipe = self.redis.pipeline(transaction=False)
            for mib in classes:
                pipe.llen(keys.queue(mib))
                pipe.scard(keys.idle(mib))
            pipe.hlen(keys.workers)
            pipe.scard(keys.waiting)
            answers = pipe.execute()
            idle = 0
            for index, mib in enumerate(classes):
                depth_by_class[mib] += answers[2 * index]
                idle += answers[2 * index + 1]
            registered, waiting = answers[-2], answers[-1]
            by_state["idle"] += idle
            by_state["waiting"] += waiting
            by_state["busy"] += max(0, registered - idle - waiting)
        depth = GaugeMetricFamily(
            "dagkube_queue_depth", LIVE["dagkube_queue_depth"][0], labels=["memory_class"]
        )
        for mib, count in sorted(depth_by_class.items()):
            depth.add_metric([memory_class(mib)], count)
        yield depth
        if self.pools:
            states = GaugeMetricFamily(
                "dagkube_workers", LIVE["dagkube_workers"][0], labels=["state"]
            )
            for state, count in by_state.items():
                states.add_metric([state], count)
            yield states
