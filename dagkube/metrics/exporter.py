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

What each metric is, with its labels and buckets, is in :mod:`dagkube.metrics.catalogue`;
how the records are folded into values is in :mod:`dagkube.metrics.aggregation`. This module
does the reading and the exposing. docs/metrics.md lists every metric and defines the
derived ones.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString
from redis.exceptions import RedisError

from dagkube.metrics.aggregation import Histogram, Totals, plan_marks
from dagkube.metrics.catalogue import (
    HISTORY_SPECS,
    LATE_FIELDS,
    SPECS,
    WORKER_STATES,
    LabelValues,
    Spec,
)
from dagkube.resources import format_memory
from dagkube.store.keys import PoolKeys, hist_all_runs, hist_run, namespace_of
from dagkube.store.records import RunRecord, TaskRecord, WorkerRecord

log = logging.getLogger("dagkube.metrics")

# Work per scrape: what is left waits for the next scrape (dagkube_exporter_runs_backlog).
INDEX_WINDOW = 2000  # how far down the run index a scrape looks for runs it has not seen
MAX_RUNS_PER_SCRAPE = 200
MAX_RECORDS_PER_SCRAPE = 50_000  # task + worker records parsed
MAX_FOLD_SECONDS = 5.0
CHUNK = 25  # runs per Redis round trip
# How long a finished run's LATE_FIELDS are re-read, and for how many runs at most.
SETTLE_S = 900.0
MAX_SETTLING_RUNS = 2000


class _Exposition:
    """The running totals as metric families.

    A label set that appears after the first exposition is exposed at zero once before its
    values: Prometheus then sees it go from 0 to its first runs, and ``rate()``/``increase()``
    count them (a series born at 1 would hide its first run from every rate).
    """

    def __init__(self) -> None:
        self._exposed: set[tuple[str, LabelValues]] = set()
        self._first = True

    def families(self, totals: Totals) -> Iterator[Metric]:
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
                yield _histogram_family(spec, totals.histograms[spec.name], born(spec.name))
                continue
            family = CounterMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
            shown = born(spec.name)
            for values, total in sorted(totals.counters[spec.name].items()):
                family.add_metric(list(values), total if shown(values) else 0.0)
            yield family


def _histogram_family(
    spec: Spec, histogram: Histogram, born: Callable[[LabelValues], bool]
) -> HistogramMetricFamily:
    """The cumulative buckets of each label set (all zero for one not ``born`` yet)."""
    family = HistogramMetricFamily(spec.name, spec.doc, labels=list(spec.labels))
    bounds = [floatToGoString(b) for b in spec.buckets] + ["+Inf"]
    for labels, counts in sorted(histogram.counts.items()):
        if not born(labels):
            family.add_metric(list(labels), [(b, 0) for b in bounds], 0.0)
            continue
        cumulative, running = [], 0
        for bound, count in zip(bounds, counts, strict=True):
            running += count
            cumulative.append((bound, running))
        family.add_metric(list(labels), cumulative, histogram.sums[labels])
    return family


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
            from dagkube.store.connection import sync_client

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
        self._totals = Totals()
        self._exposition = _Exposition()
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
            yield from self._exposition.families(self._totals)
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
            marks = plan_marks(next(answers)) if run.optimizations else {}
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
