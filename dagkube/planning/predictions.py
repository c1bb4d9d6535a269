"""Predictions from the history of one workflow structure, at an SLA (mean or percentile).

* Execution time of a function at an input size and memory class: a size model
  (:mod:`dagkube.planning.fitting`) fitted to the function's samples of that class: the curve
  that fits best (constant, power law or fixed cost plus a cost per byte), a bias per task id
  with at least ``TASK_SAMPLES`` samples of its own (durations that depend on argument
  values, which sizes cannot show), and the SLA statistic of the residual ratios, so that
  pNN is the pNN of the noise at the queried size, not of samples of other sizes.
* CPU contention: where CPU is not enforced, local workers share the machine's ``cores``.
  A function's CPU fraction (its thread's CPU time / wall time) is its demand on them; the
  samples are learnt from as if their run's other tasks had left them the cores
  (:mod:`dagkube.planning.cores`), and the timing model shares the cores among the tasks
  of the run it predicts.
* Memory classes without samples: scaled from the nearest sampled class by
  ``(cpu_sampled / cpu_wanted) ** alpha``, where a class's CPU counts at most one core: a task
  runs on one thread (native libraries get ``int(cpu)`` threads, one below two cores' worth of
  memory), so a class beyond a core does not speed it up. ``alpha`` is fitted from the
  function's per-class medians when two or more classes have samples (clamped to [0, 1]);
  with one class it is 1 where the backend enforces CPU limits (Pods, local workers in
  cgroups: twice the CPU, half the time), and 0 where it does not (local worker processes
  without limits all share the machine's cores).
* Output size: the same kind of size model over (input bytes -> output bytes), any class.
* Peak memory (the worker's, while the task ran): the SLA statistic over the nearest samples
  in input size, each shifted to the queried size along the function's least-squares line of
  peak bytes on input bytes (memory grows with what a task holds, linearly, on top of the
  interpreter's fixed share; the slope is 0 unless inputs vary). A task's own samples come
  first. :meth:`Predictor.memory_floor_mib` adds ``MEMORY_HEADROOM`` and never goes below a
  class an earlier attempt was OOM-killed at: planners keep every task at or above it.
* Transfers (:mod:`dagkube.planning.transfers`): downloads and uploads each by their own
  ``latency + bytes / bandwidth`` times a factor per size bucket, learnt from that
  direction's samples (they take different paths: batched reads, writes with the completion
  script); a task's download is one fetch of all the values it lacks, as the worker does it.
* Worker start-up, cold or warm, per class: SLA statistic of the recorded start-ups; a class
  without samples borrows from the nearest sampled class, a cold start scaled by CPU where
  CPU is enforced (starting a worker is CPU-bound: imports; a 1 GiB worker starts about 1.75x
  slower than a 2 GiB one); none at all: the configured defaults.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from dagkube.dag import DagSpec
from dagkube.planning.cores import alone_times, cpu_fraction
from dagkube.planning.fitting import SizeModel, fit_size_model, slope, statistic
from dagkube.planning.history import HistorySnapshot, TaskSample
from dagkube.planning.sla import sla_percentile
from dagkube.planning.transfers import TransferModel, fit_transfers, upload_sharing
from dagkube.resources import DEFAULT_MAX_CPU, DEFAULT_MEMORY_PER_CPU_MIB, cpu_for_memory

__all__ = ["Defaults", "Estimates", "Predictor", "estimate", "statistic"]

TASK_SAMPLES = 3
MIN_PREWARM_SAMPLES = 3  # start-ups of one kind (pre-warmed or not) before it is predicted apart
MIN_OVERHEAD_SAMPLES = 5  # of one kind, for a class, before the per-task overhead is learnt
# A class must exceed a task's predicted peak by this share: the limit also counts the page
# cache and allocator slack that the resident-set peak does not show.
MEMORY_HEADROOM = 0.25
MIB = 1024 * 1024


@dataclass(frozen=True)
class Defaults:
    """What a planner assumes without history (documented in the Plan's notes when used)."""

    exec_s: float = 0.05
    output_bytes: int = 1024
    latency_s: float = 0.0005
    bandwidth_bytes_s: float = 300e6
    cold_start_s: float = 0.5
    warm_start_s: float = 0.005
    task_overhead_s: float = 0.0005  # one Redis round trip and the bookkeeping around it


@dataclass
class _FunctionModel:
    exec_by_class: dict[int, SizeModel]
    output: SizeModel
    alpha: float
    slope_memory: float = 0.0  # peak bytes per input byte


@dataclass
class Predictor:
    """Answers the planner's questions from a history snapshot, at one SLA."""

    history: HistorySnapshot
    sla: str = "avg"
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB
    max_cpu: float = DEFAULT_MAX_CPU
    defaults: Defaults = field(default_factory=Defaults)
    startup_delay_s: float = 0.0  # added to default cold starts (LocalBackend's emulation)
    cpu_enforced: bool = True  # do workers get only their class's CPU? (Pods: yes; local: no)
    # Cores the workers share, for the timing model's CPU contention; None: not modelled.
    # Unenforced workers are local processes on this machine: its cores unless given.
    cores: int | None = None
    used_defaults: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.percentile = sla_percentile(self.sla)
        if self.cores is None and not self.cpu_enforced:
            self.cores = os.cpu_count() or 1
        grouped: dict[str, list[TaskSample]] = defaultdict(list)
        for sample in self.history.tasks:
            grouped[sample.function].append(sample)
        self._fractions = {name: cpu_fraction(samples) for name, samples in grouped.items()}
        alone = (
            alone_times(self.history.tasks, self._fractions, self.cores)
            if self.cores is not None
            else [s.exec_s for s in self.history.tasks]
        )
        points: dict[str, list[tuple[TaskSample, float]]] = defaultdict(list)
        for sample, exec_s in zip(self.history.tasks, alone, strict=True):
            points[sample.function].append((sample, exec_s))
        self._models = {name: self._fit(found) for name, found in points.items()}
        self._exec_cache: dict[tuple[str, str, int, int], float] = {}
        self._output_cache: dict[tuple[str, str, int], int] = {}
        self._startup_cache: dict[tuple[int, bool, bool], float] = {}
        # class -> (kind, on a bound worker) -> seconds
        self._overheads: dict[int, dict[tuple[str, bool], list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for gap in self.history.overheads:
            self._overheads[gap.memory_mib][(gap.kind, gap.bound)].append(gap.seconds)
        self._overhead_cache: dict[tuple[int, bool], tuple[float, float]] = {}
        self._floor_cache: dict[tuple[str, int], int] = {}
        # Memory evidence (peaks measured, OOM kills) by task id and by function.
        self._memory_tasks: dict[str, list[TaskSample]] = defaultdict(list)
        self._memory_functions: dict[str, list[TaskSample]] = defaultdict(list)
        for sample in self.history.tasks:
            if sample.peak_memory_bytes > 0 or sample.oom_mib:
                self._memory_functions[sample.function].append(sample)
                if sample.task_id:
                    self._memory_tasks[sample.task_id].append(sample)
        self._fit_transfers()

    # ------------------------------------------------------------------ fitting
    def _fit(self, found: list[tuple[TaskSample, float]]) -> _FunctionModel:
        """A function's models from its samples, each with its execution time alone."""
        samples = [sample for sample, _ in found]
        by_class: dict[int, list[tuple[float, float, str]]] = defaultdict(list)
        for sample, exec_s in found:
            by_class[sample.memory_mib].append((sample.input_bytes, exec_s, sample.task_id))
        alpha = 1.0 if self.cpu_enforced else 0.0
        if len(by_class) >= 2:
            points = [
                (
                    math.log(self._cpu(memory)),
                    math.log(max(statistic([e for _, e, _ in p], 50), 1e-6)),
                )
                for memory, p in by_class.items()
            ]
            alpha = -slope(points)
        measured = [s for s in samples if s.peak_memory_bytes > 0]
        slope_memory = 0.0
        if len(measured) >= 3:
            sizes = [max(s.input_bytes, 1) for s in measured]
            if max(sizes) / min(sizes) > 1.5:
                slope_memory = max(
                    0.0, slope([(s.input_bytes, s.peak_memory_bytes) for s in measured])
                )
        return _FunctionModel(
            exec_by_class={
                memory: fit_size_model(points, self.percentile, min_group=TASK_SAMPLES)
                for memory, points in by_class.items()
            },
            output=fit_size_model(
                [(s.input_bytes, s.output_bytes, s.task_id) for s in samples],
                self.percentile,
                min_group=TASK_SAMPLES,
                floor=1.0,
            ),
            alpha=min(max(alpha, 0.0), 1.0),
            slope_memory=slope_memory,
        )

    def _fit_transfers(self) -> None:
        """A model per direction; a direction without samples borrows the joint one (never
        a direction with samples: a few downloads at the uploads' rate were priced 4x too
        slow). The joint model (for callers that do not say which way) is fitted once asked."""
        tasks = self.history.tasks
        downloads = [(s.download_bytes, s.download_s) for s in tasks]
        uploads = [(s.upload_bytes, s.upload_s) for s in tasks]
        self._transfer_samples = [(b, t) for b, t in downloads + uploads if b > 0 and t > 0]
        self._transfers: TransferModel | None = None
        downloads = [(b, t) for b, t in downloads if b > 0 and t > 0]
        shared = [
            (s.upload_bytes, s.upload_s, k)
            for s, k in zip(tasks, upload_sharing(tasks), strict=True)
            if s.upload_bytes > 0 and s.upload_s > 0
        ]
        self.downloads = self._fit_transfer(downloads) if downloads else self.transfers
        self.uploads = self._fit_transfer(shared) if shared else self.transfers

    def _fit_transfer(
        self, samples: Sequence[tuple[int, float] | tuple[int, float, int]]
    ) -> TransferModel:
        return fit_transfers(
            samples,
            self.percentile,
            latency_s=self.defaults.latency_s,
            bandwidth_bytes_s=self.defaults.bandwidth_bytes_s,
        )

    @property
    def transfers(self) -> TransferModel:
        """Downloads and uploads in one model."""
        if self._transfers is None:
            self._transfers = self._fit_transfer(self._transfer_samples)
        return self._transfers

    def _cpu(self, memory_mib: int) -> float:
        """The CPU a task can use on this class: its share, at most one core (one thread)."""
        return min(cpu_for_memory(memory_mib, self.memory_per_cpu_mib, self.max_cpu), 1.0)

    def _nearest(self, samples: list[TaskSample], input_bytes: int) -> list[TaskSample]:
        k = max(5, len(samples) // 5)
        if len(samples) <= k:
            return samples
        target = math.log(max(input_bytes, 1))
        return sorted(samples, key=lambda s: abs(math.log(max(s.input_bytes, 1)) - target))[:k]

    # ------------------------------------------------------------------ questions
    def exec_s(self, function: str, input_bytes: int, memory_mib: int, task_id: str = "") -> float:
        """Seconds the task computes when it has the CPU its class gives it to itself (the
        timing model adds contention for shared cores)."""
        key = (function, task_id, _bucket(input_bytes), memory_mib)
        cached = self._exec_cache.get(key)
        if cached is not None:
            return cached
        model = self._models.get(function)
        if model is None:
            self.used_defaults.add("execution time")
            value = self.defaults.exec_s
        else:
            source = memory_mib
            if source not in model.exec_by_class:
                source = min(model.exec_by_class, key=lambda m: abs(math.log(m / memory_mib)))
            value = model.exec_by_class[source].predict(input_bytes, task_id)
            if source != memory_mib:
                value *= (self._cpu(source) / self._cpu(memory_mib)) ** model.alpha
        self._exec_cache[key] = value
        return value

    def cpu_fraction(self, function: str) -> float:
        """The share of its execution a function's thread spends on a CPU (0: unknown): the
        demand it puts on shared cores."""
        return self._fractions.get(function, 0.0)

    def output_bytes(self, function: str, input_bytes: int, task_id: str = "") -> int:
        key = (function, task_id, _bucket(input_bytes))
        cached = self._output_cache.get(key)
        if cached is not None:
            return cached
        model = self._models.get(function)
        if model is None:
            self.used_defaults.add("output size")
            value = self.defaults.output_bytes
        else:
            value = round(model.output.predict(input_bytes, task_id))
        self._output_cache[key] = value
        return value

    def peak_memory_bytes(self, function: str, input_bytes: int, task_id: str = "") -> int:
        """The worker's predicted peak while the task runs; 0 without measurements."""
        measured = [s for s in self._memory_tasks.get(task_id, ()) if s.peak_memory_bytes > 0]
        if not measured:
            measured = [
                s for s in self._memory_functions.get(function, ()) if s.peak_memory_bytes > 0
            ]
        if not measured:
            return 0
        model = self._models.get(function)
        per_byte = model.slope_memory if model is not None else 0.0
        near = self._nearest(measured, input_bytes)
        shifted = [
            max(0.0, s.peak_memory_bytes + per_byte * (input_bytes - s.input_bytes)) for s in near
        ]
        return int(statistic(shifted, self.percentile))

    def memory_floor_mib(self, function: str, input_bytes: int, task_id: str = "") -> int:
        """The smallest memory a class for this task should have: its predicted peak plus
        ``MEMORY_HEADROOM``, and more than any class an earlier attempt was OOM-killed at
        (that attempt's task, or the function's at a similar input size). 0: no evidence."""
        if function not in self._memory_functions:
            return 0  # nothing measured for it (e.g. history from before peaks were recorded)
        own = self._memory_tasks.get(task_id)
        key = (task_id if own else function, _bucket(input_bytes))
        cached = self._floor_cache.get(key)
        if cached is not None:
            return cached
        peak = self.peak_memory_bytes(function, input_bytes, task_id)
        floor = math.ceil(peak * (1 + MEMORY_HEADROOM) / MIB) if peak else 0
        evidence = own or self._nearest(self._memory_functions[function], input_bytes)
        killed = max((s.oom_mib for s in evidence), default=0)
        if killed:
            floor = max(floor, killed + 1)
        self._floor_cache[key] = floor
        return floor

    def transfer_s(self, nbytes: int) -> float:
        """Seconds to move ``nbytes`` to or from Redis, either way (0 bytes: nothing to
        move); :meth:`download_s` and :meth:`upload_s` know which way."""
        return self.transfers.seconds(nbytes)

    def download_s(self, nbytes: int) -> float:
        """Seconds of a task's one fetch of ``nbytes`` of values it lacks (neither held nor
        pre-loaded; 0: nothing fetched)."""
        return self.downloads.seconds(nbytes)

    def upload_s(self, nbytes: int, sharing: int = 1) -> float:
        """Seconds of a task's completion call that stores its ``nbytes`` output while
        ``sharing`` - 1 other uploads are in flight (:func:`transfers.upload_sharing`)."""
        return self.uploads.seconds(nbytes, sharing)

    def startup_s(self, memory_mib: int, cold: bool, prewarmed: bool = False) -> float:
        """Seconds from spawn (cold) or from taking an invocation (warm) to the first task, at
        the SLA. Pre-warmed workers start in groups (locally sharing the cores: slower than a
        start on demand), so ``prewarmed`` (spawn to ready of a pre-warmed worker) and cold
        starts on demand are each predicted from their own kind once MIN_PREWARM_SAMPLES of
        it exist for the nearest class, else from every cold start."""
        key = (memory_mib, cold, prewarmed)
        cached = self._startup_cache.get(key)
        if cached is not None:
            return cached
        by_class: dict[int, list[float]] = defaultdict(list)
        alike: dict[int, list[float]] = defaultdict(list)  # started as this one will be
        for sample in self.history.startups:
            if sample.cold == cold:
                by_class[sample.memory_mib].append(sample.startup_s)
                if sample.prewarmed == prewarmed:
                    alike[sample.memory_mib].append(sample.startup_s)
        if by_class:
            source = _nearest_class(by_class, memory_mib)
            samples = by_class[source]
            if len(alike.get(source, ())) >= MIN_PREWARM_SAMPLES:
                samples = alike[source]
            value = statistic(samples, self.percentile)
            if cold and self.cpu_enforced and source != memory_mib:
                value *= self._cpu(source) / self._cpu(memory_mib)
        else:
            self.used_defaults.add("cold start-up" if cold else "warm start-up")
            value = (
                self.defaults.cold_start_s + self.startup_delay_s
                if cold
                else self.defaults.warm_start_s
            )
        self._startup_cache[key] = value
        return value

    def task_overhead_s(self, memory_mib: int, bound: bool = False) -> float:
        """Seconds a worker of the class spends on a task besides executing it and moving its
        data, from the previous task's completion (within an invocation) to this one's
        execution: its "pre" and "post" (:class:`dagkube.planning.history.OverheadSample`),
        on a bound worker or a flexible one."""
        return self._overhead(memory_mib, bound)[0]

    def handover_s(self, memory_mib: int, bound: bool = False) -> float:
        """Seconds a worker of the class spends ending an invocation and taking the next one
        queued (``FINISH``, which hands it over), beyond a task's "post"."""
        return self._overhead(memory_mib, bound)[1]

    def _overhead(self, memory_mib: int, bound: bool) -> tuple[float, float]:
        """(task overhead, handover), learnt from the nearest class with samples, scaled by
        CPU where CPU is enforced (the work is the worker's Python). Each kind by its median,
        at every SLA: one run that went badly (hundreds of workers on two cores) must not
        raise every task's overhead for the next twenty runs, as it raised the mean of "pre"
        from 2.6 to 22 ms on cycles-1000; and a plan may have few of one kind (wukong
        continues on a worker only now and then), the unusual ones (a fan-in's). Each kind
        from the samples of the same worker mode (bound or flexible) when there are enough:
        a bound worker's task costs a fifth of a flexible one's "pre" (0.1 against 0.7 ms on
        a no-op fan-out), and pooled they made uniform's plan look slower than wukong's.
        Kinds with fewer than MIN_OVERHEAD_SAMPLES samples count as 0; without any, the
        default."""
        cached = self._overhead_cache.get((memory_mib, bound))
        if cached is not None:
            return cached
        task_s, handover_s = self.defaults.task_overhead_s, 0.0
        if self._overheads:
            source = _nearest_class(self._overheads, memory_mib)
            kinds = self._overheads[source]
            scale = 1.0
            if self.cpu_enforced and source != memory_mib:
                scale = self._cpu(source) / self._cpu(memory_mib)

            def learnt(kind: str) -> float:
                found = kinds.get((kind, bound), [])
                if len(found) < MIN_OVERHEAD_SAMPLES:  # both modes' together
                    found = found + kinds.get((kind, not bound), [])
                return statistic(found, 50) if len(found) >= MIN_OVERHEAD_SAMPLES else 0.0

            post = learnt("post")
            task_s = (learnt("pre") + post) * scale
            handover_s = max(0.0, learnt("handover") - post) * scale
        self._overhead_cache[(memory_mib, bound)] = (task_s, handover_s)
        return task_s, handover_s

    @property
    def sample_count(self) -> int:
        return len(self.history.tasks) + len(self.history.startups)


def _nearest_class(classes: Iterable[int], memory_mib: int) -> int:
    """The sampled class nearest ``memory_mib`` in ratio (ties: the larger)."""
    return min(classes, key=lambda m: (abs(math.log(m / memory_mib)), -m))


def _bucket(nbytes: int) -> int:
    """Input sizes within ~3% predict alike: bucket them for caching."""
    return 0 if nbytes <= 0 else round(math.log(nbytes) * 32)


@dataclass
class Estimates:
    """Per task, in topological order: predicted input bytes, output bytes, execution time."""

    input_bytes: dict[str, int]
    out_bytes: dict[str, int]
    exec_s: dict[str, float]


def estimate(dag: DagSpec, predictor: Predictor, memory: dict[str, int]) -> Estimates:
    """A task's input is its upstream outputs, its large constants and its inline arguments
    (the same sum the worker records as ``input_bytes``)."""
    input_bytes: dict[str, int] = {}
    out_bytes: dict[str, int] = {}
    exec_s: dict[str, float] = {}
    const_bytes = {k: len(v) for k, v in dag.constants.items()}
    for task_id, spec in dag.tasks.items():
        size = (
            len(spec.args_blob)
            + sum(out_bytes[d] for d in spec.deps)
            + sum(const_bytes.get(k, 0) for k in spec.const_keys)
        )
        input_bytes[task_id] = size
        out_bytes[task_id] = predictor.output_bytes(spec.function, size, task_id)
        exec_s[task_id] = predictor.exec_s(spec.function, size, memory[task_id], task_id)
    return Estimates(input_bytes, out_bytes, exec_s)
