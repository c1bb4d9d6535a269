"""Planning rules of the optimizations, and the check that rejects conflicting ones.

Rules run in :data:`~dagkube.planning.model.OPTIMIZATIONS` order on a plan's predicted
schedule: ``clustering`` and ``delayed-io`` (flexible workers: keep large outputs local),
``preload`` (fetch fan-in inputs in the background), ``taskdup`` (a waiting consumer may re-run
a late upstream), then ``prewarm``, which needs the schedule the others produce (it re-runs the
timing model with their effect). Each rule only marks tasks where it can help; the runtime hooks
read the marks (docs/architecture.md, "Optimizations").
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from dagkube.dag import DagSpec
from dagkube.errors import InvalidOption
from dagkube.planning.history import HistorySnapshot
from dagkube.planning.model import (
    OPT_VARIANTS,
    OPTIMIZATIONS,
    Clustering,
    ClusteringParams,
    DelayedIo,
    DelayedIoParams,
    Optimization,
    Preload,
    PreloadParams,
    Prewarm,
    PrewarmParams,
    Taskdup,
    TaskdupParams,
    output_must_be_stored,
)
from dagkube.planning.predictions import Estimates, Predictor
from dagkube.planning.timing import Timing

PREWARM_MIN_WAIT_S = 0.1  # only invocations predicted to wait longer for a worker are targets
DELAY_MARGIN_S = 0.05  # delayed-io waits this much beyond the predicted arrival of the others
MIN_SAVING_S = 0.002  # preload / delayed-io only where they save at least this much transfer
# taskdup is not modelled: what earlier duplicates gained is its only evidence. A function
# whose duplicates of the snapshot's runs (at least this many) gained nothing in all, their
# originals ending no later than they did, is not duplicated again (the task itself is slow,
# not the worker that ran it); its marks come back once those runs leave the snapshot.
TASKDUP_MIN_EVIDENCE = 2

Marks = dict[str, list[Optimization]]


def check_optimizations(names: Iterable[str] | str | None) -> list[str]:
    """Normalize a list (or comma-separated string) of optimizations, in composition order."""
    if names is None:
        return []
    items = names.split(",") if isinstance(names, str) else list(names)
    chosen = {str(n).strip().lower() for n in items if str(n).strip()}
    unknown = sorted(chosen - set(OPTIMIZATIONS))
    if unknown:
        raise InvalidOption(
            f"Optimization {unknown[0]!r} is unknown: choose from {', '.join(OPTIMIZATIONS)}"
        )
    return [n for n in OPTIMIZATIONS if n in chosen]


def split_planner(name: str) -> tuple[str, list[str]]:
    """``uniform-opt`` -> (``uniform``, its optimizations); other names pass through."""
    base = name.strip().lower()
    if base.endswith("-opt") and base[:-4] in OPT_VARIANTS:
        return base[:-4], list(OPT_VARIANTS[base[:-4]])
    return base, []


@dataclass
class RuleInput:
    dag: DagSpec
    memory: dict[str, int]
    worker_of: dict[str, str | None]
    predictor: Predictor
    sizes: Estimates
    timing: Timing


def mark(names: list[str], given: RuleInput) -> Marks:
    """Marks of every rule but ``prewarm`` (see :func:`mark_prewarm`)."""
    marks: Marks = {}
    rules: dict[str, Callable[[RuleInput, Marks], None]] = {
        "clustering": _clustering,
        "delayed-io": _delayed_io,
        "preload": _preload,
        "taskdup": _taskdup,
    }
    for name in names:
        if name in rules:
            rules[name](given, marks)
    return marks


def _add(marks: Marks, task_id: str, entry: Optimization) -> None:
    marks.setdefault(task_id, []).append(entry)


def _clustering(given: RuleInput, marks: Marks) -> None:
    """A flexible fan-out runs all its children itself when shipping its output to other
    workers (upload, start-up, download) would take longer than running them one by one."""
    dag, p, sizes = given.dag, given.predictor, given.sizes
    for task_id, spec in dag.tasks.items():
        children = spec.downstream
        if given.worker_of[task_id] is not None or len(children) < 2:
            continue
        if any(len(dag.tasks[c].deps) != 1 or given.worker_of[c] is not None for c in children):
            continue
        out = sizes.out_bytes[task_id]
        remote = p.upload_s(out) + p.download_s(out) + p.startup_s(given.memory[children[0]], False)
        serial = sum(sizes.exec_s[c] for c in children) - max(sizes.exec_s[c] for c in children)
        if serial <= remote:
            _add(marks, task_id, Clustering(params=ClusteringParams(children=list(children))))


def _delayed_io(given: RuleInput, marks: Marks) -> None:
    """Per flexible fan-in, the input whose upload and download cost most relative to how long
    its worker would wait for the other inputs: that worker waits and runs the fan-in itself."""
    dag, p, sizes, timing = given.dag, given.predictor, given.sizes, given.timing
    for task_id, spec in dag.tasks.items():
        if given.worker_of[task_id] is not None or len(spec.deps) < 2:
            continue
        best: tuple[float, str, float] | None = None
        # The latest completion among a dep's siblings: the latest of all, or for the dep that
        # completes last, the runner-up (linear in the fan-in's width, not quadratic).
        ranked = heapq.nlargest(2, spec.deps, key=lambda d: timing.tasks[d].complete_s)
        latest, runner_up = (timing.tasks[d].complete_s for d in ranked)
        for dep in spec.deps:
            if given.worker_of[dep] is not None or dag.tasks[dep].downstream != [task_id]:
                continue
            if dep in dag.output_ids:
                continue
            others = runner_up if dep == ranked[0] else latest
            wait = max(0.0, others - timing.tasks[dep].end_s)
            saved = p.upload_s(sizes.out_bytes[dep]) + p.download_s(sizes.out_bytes[dep]) - wait
            if saved >= MIN_SAVING_S and (best is None or saved > best[0]):
                best = (saved, dep, wait)
        if best is not None:
            _, dep, wait = best
            params = DelayedIoParams(fan_in=task_id, wait_s=round(wait + DELAY_MARGIN_S, 6))
            _add(marks, dep, DelayedIo(params=params))


def _preload(given: RuleInput, marks: Marks) -> None:
    """A fan-in's inputs from other workers are fetched by the worker that will run it while
    it still works on something else: its logical worker, or (flexible) the worker of the
    input predicted to finish last."""
    dag, timing = given.dag, given.timing
    for task_id, spec in dag.tasks.items():
        if len(spec.deps) < 2:
            continue
        me = given.worker_of[task_id]
        if me is not None:
            host = me
            inputs = [d for d in spec.deps if given.worker_of[d] != me]
        else:
            last = max(spec.deps, key=lambda d: timing.tasks[d].complete_s)
            host = "@" + last
            inputs = [d for d in spec.deps if d != last]
        fetched = given.predictor.download_s(sum(given.sizes.out_bytes[d] for d in inputs))
        if inputs and fetched >= MIN_SAVING_S:
            _add(marks, task_id, Preload(params=PreloadParams(host=host, inputs=inputs)))


def duplicates_lost(history: HistorySnapshot) -> dict[str, tuple[int, float]]:
    """Functions whose earlier duplicates gained nothing: function -> (duplicates, seconds
    gained in all, <= 0), from the snapshot's :class:`~.history.DuplicateSample`."""
    tally: dict[str, tuple[int, float]] = {}
    for sample in history.duplicates:
        count, saved = tally.get(sample.function, (0, 0.0))
        tally[sample.function] = (count + 1, saved + sample.saved_s)
    return {f: (n, s) for f, (n, s) in tally.items() if n >= TASKDUP_MIN_EVIDENCE and s <= 0}


def _taskdup(given: RuleInput, marks: Marks) -> None:
    """A bound consumer may re-run an upstream of another worker whose inputs are stored in
    Redis, unless that upstream's function's earlier duplicates gained nothing; the
    parameters are what the worker decides from when the upstream is late."""
    dag, p, sizes, timing = given.dag, given.predictor, given.sizes, given.timing
    lost = duplicates_lost(p.history)
    for task_id, spec in dag.tasks.items():
        me = given.worker_of[task_id]
        if me is None:
            continue
        for dep in spec.deps:
            owner = given.worker_of[dep]
            if owner is None or owner == me:
                continue
            upstream = dag.tasks[dep]
            if upstream.function in lost:
                continue
            if not all(_stored(given, marks, d) for d in upstream.deps):
                continue
            fetched = sum(sizes.out_bytes[d] for d in upstream.deps if given.worker_of[d] != me)
            here_s = p.exec_s(upstream.function, sizes.input_bytes[dep], given.memory[task_id], dep)
            params = TaskdupParams(
                upstream=dep,
                exec_s=round(here_s + p.download_s(fetched), 6),
                original_end_s=round(timing.tasks[dep].end_s, 6),
                original_exec_s=round(sizes.exec_s[dep], 6),
            )
            _add(marks, task_id, Taskdup(params=params))


def _stored(given: RuleInput, marks: Marks, task_id: str) -> bool:
    clustered = any(isinstance(o, Clustering) for o in marks.get(task_id, ()))
    return output_must_be_stored(given.dag, task_id, given.worker_of.__getitem__, clustered)


def mark_prewarm(given: RuleInput, marks: Marks) -> int:
    """Every invocation predicted to wait for a worker to start (queued after the run began,
    not taken by an idle or finishing worker within a warm start) is a target: a worker
    spawned at ``queued - cold start-up`` is ready when it is needed. The start-up is the
    Predictor's at the plan's SLA, learnt from earlier pre-warmed workers (which start in
    groups), with nothing added: a worker ready early is charged while it waits, so a margin
    would be paid by every pre-warmed worker of every run; at SLA avg early and late balance
    around the mean start-up, and at pNN the percentile is the margin. A request due before
    its trigger is predicted to start gets a negative ``delay_s`` (never before the run's
    start): the driver sends it at submission. Returns how many workers are requested."""
    timing, p = given.timing, given.predictor
    starts = sorted(given.dag.tasks, key=lambda t: timing.tasks[t].start_s)
    requests: dict[tuple[str, int], list[tuple[float, str]]] = {}
    for activity in timing.activities:
        if activity.queued_s <= 0 or activity.prewarmed or not activity.tasks:
            continue
        waited = activity.ready_s - activity.queued_s
        if waited <= p.startup_s(activity.memory_mib, False) + PREWARM_MIN_WAIT_S:
            continue
        cold = p.startup_s(activity.memory_mib, True, prewarmed=True)
        fire_at = activity.queued_s - cold
        trigger = _prewarm_trigger(timing, starts, activity.tasks[0], fire_at)
        if trigger in activity.tasks:
            continue
        requests.setdefault((trigger, activity.memory_mib), []).append((fire_at, activity.tasks[0]))
    for (trigger, memory_mib), wanted in requests.items():
        fire_at = min(f for f, _ in wanted)
        params = PrewarmParams(
            memory_mib=memory_mib,
            count=len(wanted),
            delay_s=round(max(0.0, fire_at) - timing.tasks[trigger].start_s, 6),
            targets=sorted(t for _, t in wanted),
        )
        _add(marks, trigger, Prewarm(params=params))
    return sum(len(w) for w in requests.values())


def _prewarm_trigger(timing: Timing, starts: list[str], target: str, fire_at: float) -> str:
    """The task whose start anchors a pre-warm request due at ``fire_at``: the nearest task of
    the chain that makes ``target`` ready (its trigger, the trigger's trigger, ...) predicted
    to start by then, so the request is timed from the work the demand waits for (its start
    plus its predicted time) rather than from an unrelated task; else the task predicted to
    start last by then (the first to start when none has: the request is then due before its
    trigger starts, and sent at submission)."""
    current = timing.tasks[target].trigger
    while current is not None:
        if timing.tasks[current].start_s <= fire_at:
            return current
        current = timing.tasks[current].trigger
    latest = starts[0]
    for task_id in starts:
        if timing.tasks[task_id].start_s > fire_at:
            break
        latest = task_id
    return latest


def check_conflicts(dag: DagSpec, tasks: dict[str, list[Optimization]], stored: Callable) -> None:
    """Reject a plan where two optimizations decide the same thing differently, naming both
    and the task. ``stored(task_id)`` is the plan's upload rule."""
    delayed_by_fan_in: dict[str, str] = {}
    for task_id, entries in tasks.items():
        names = [e.name for e in entries]
        if "clustering" in names and "delayed-io" in names:
            raise InvalidOption(
                f"Task {task_id!r}: optimizations 'clustering' and 'delayed-io' conflict: "
                "clustering runs its children on its worker, delayed-io has the worker wait "
                "to run a fan-in instead"
            )
        for entry in entries:
            if isinstance(entry, DelayedIo):
                fan_in = entry.params.fan_in
                other = delayed_by_fan_in.setdefault(fan_in, task_id)
                if other != task_id:
                    raise InvalidOption(
                        f"Task {fan_in!r}: 'delayed-io' on its inputs {other!r} and {task_id!r} "
                        "conflict: both workers would wait to run it (each waiting for the other)"
                    )
    delayed = {
        e.params.fan_in: t for t, es in tasks.items() for e in es if isinstance(e, DelayedIo)
    }
    for task_id, entries in tasks.items():
        for entry in entries:
            if isinstance(entry, Preload):
                held = delayed.get(task_id)
                if held is not None and held in entry.params.inputs:
                    raise InvalidOption(
                        f"Task {task_id!r}: optimizations 'preload' and 'delayed-io' conflict: "
                        f"preload fetches its input {held!r} as soon as it is stored, while "
                        f"delayed-io holds {held!r} back to run {task_id!r} on its own worker"
                    )
            elif isinstance(entry, Taskdup):
                upstream = entry.params.upstream
                for dep in dag.tasks[upstream].deps:
                    if stored(dep):
                        continue
                    why = [e.name for e in tasks.get(dep, ()) if e.name in ("clustering",)]
                    if why:
                        raise InvalidOption(
                            f"Task {task_id!r}: optimizations 'taskdup' and 'clustering' "
                            f"conflict: taskdup would re-run {upstream!r}, whose input {dep!r} "
                            f"clustering keeps on its own worker (never stored)"
                        )
                    raise InvalidOption(
                        f"Task {task_id!r}: 'taskdup' cannot re-run {upstream!r}: its input "
                        f"{dep!r} is not stored in Redis"
                    )
