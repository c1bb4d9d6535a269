"""dagkube's planners and Dask on real scientific workflow shapes (WfCommons recipes).

Each shape (benchmarks/wfshapes.py: Cycles, Seismology, SoyKB, SRASearch, BWA, RNA-seq at about
100 and 1,000 tasks) is replayed on dagkube's LocalRuntime and on Dask's LocalCluster with the
same number of single-threaded workers. Every task sleeps (``--variant sleep``) or burns CPU
(``--variant cpu``) for its recorded runtime scaled, times a log-normal factor of mean 1 and
CV ``--cv``, and returns its recorded output size scaled, in bytes; its children receive it.
Runtimes are scaled per shape so that the lower bound of the recorded runtimes is
``--target-s`` x sqrt(size / 100) seconds; bytes by the same factor unless ``--byte-scale``.

Protocol per shape: ``--warmup`` untimed rounds of every planner (the history the planners
learn from: runs of the same workflow); then each engine in turn (the order rotates from shape
to shape) runs once untimed, so that its own workers, of the classes its plans use, are warm,
and ``--runs`` timed runs. Timed run r draws its durations from a generator seeded with (seed,
shape, r): every engine replays the same draws. A run is timed in the driver from submission
(dagkube: ``wf.run``, which plans and uploads; Dask: ``client.compute``) to the outputs being
back, and divided by its lower bound: max(critical path, total work / workers) of the
durations drawn (``cpu``: workers at most this machine's cores). Reported: the median ratio.

Usage: python benchmarks/shapes.py [--tasks 100,1000] [--recipes cycles,bwa] [--runs 5]
       [--warmup 2] [--workers 4] [--variant sleep|cpu] [--planners wukong,uniform]
       [--quick] [--json F] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import benchlib
from dask_engines import started_engines
from wfshapes import SHAPES, Replay

import dagkube
from dagkube.errors import RunTimeout, TaskFailed
from dagkube.metrics.history import read_run
from dagkube.planning import PLANNER_NAMES, check_planner

if TYPE_CHECKING:
    from dask_engines import Engines

DEFAULT_PLANNERS = ("wukong", "uniform", "non-uniform", "uniform-opt", "auto")
DASK = "dask"
AUTO = "auto"
REFERENCE_TASKS = 100  # --target-s is the lower bound at this size; larger ones grow by sqrt

# --------------------------------------------------------------------------- task functions
# Plain functions in the script's __main__, so both engines ship them to their workers by
# value. ``inputs`` are the parents' outputs: the engine moves them, which is what is measured.


def replay_sleep(duration_s: float, output_bytes: int, inputs: list[bytes]) -> bytes:
    time.sleep(duration_s)
    return bytes(output_bytes)


def replay_cpu(duration_s: float, output_bytes: int, inputs: list[bytes]) -> bytes:
    """Busy for ``duration_s`` of this thread's CPU time (longer in wall time when the
    worker shares a core)."""
    deadline = time.thread_time() + duration_s
    spins = 0
    while time.thread_time() < deadline:
        spins += sum(range(200))
    return bytes(output_bytes)


VARIANTS: dict[str, Callable[[float, int, list[bytes]], bytes]] = {
    "sleep": replay_sleep,
    "cpu": replay_cpu,
}

# --------------------------------------------------------------------------- graphs


def build_dagkube(replay: Replay, durations: list[float], fn: Callable) -> dagkube.Workflow:
    """One dagkube task per shape task, named by its type (ids stay stable run to run)."""
    steps: dict[str, Any] = {}
    nodes: list[Any] = []
    sizes = replay.output_sizes
    for index, task in enumerate(replay.shape.tasks):
        step = steps.setdefault(task.kind, dagkube.task(name=task.kind)(fn))
        nodes.append(step(durations[index], sizes[index], [nodes[p] for p in task.parents]))
    name = f"shape-{replay.shape.name}-{len(nodes)}"
    return dagkube.Workflow([nodes[i] for i in replay.shape.sinks], name)


def build_dask(replay: Replay, durations: list[float], fn: Callable) -> list[Any]:
    import dask

    step = dask.delayed(fn, pure=False)
    nodes: list[Any] = []
    sizes = replay.output_sizes
    # Keys unique to this run: with the same keys as the run before, the scheduler can still
    # hold that run's results when this graph arrives (its futures are released
    # asynchronously) and hand them back without running anything: srasearch-100 once
    # measured Dask at 0.01x of the lower bound.
    run = uuid.uuid4().hex[:8]
    for index, task in enumerate(replay.shape.tasks):
        parents = [nodes[p] for p in task.parents]
        key = f"{task.kind}-{index}-{run}"
        nodes.append(step(durations[index], sizes[index], parents, dask_key_name=key))
    return [nodes[i] for i in replay.shape.sinks]


def check_outputs(replay: Replay, outputs: Any, engine: str) -> None:
    expected = [replay.output_sizes[i] for i in replay.shape.sinks]
    got = [len(value) for value in outputs]
    if got != expected:
        raise AssertionError(f"{engine}: output sizes {got[:5]}... != expected {expected[:5]}...")


# --------------------------------------------------------------------------- measurement


@dataclass
class ShapeResult:
    """Every timed run of one shape, and what is reported about them."""

    shape: str
    size: int
    tasks: int
    depth: int
    edges: int
    source: str
    time_scale: float
    byte_scale: float
    output_bytes: int
    lower_bounds_s: list[float] = field(default_factory=list)
    window_bounds_s: list[float] = field(default_factory=list)  # Shape.window_bound_s
    seconds: dict[str, list[float]] = field(default_factory=dict)
    predicted_s: dict[str, list[float]] = field(default_factory=dict)  # dagkube plans
    # Most tasks running at once in each dagkube run (workers blocked waiting for inputs do
    # not count against LocalRuntime's max_workers: more than --workers tasks can run).
    most_at_once: dict[str, list[int]] = field(default_factory=dict)
    changes: dict[str, list[int]] = field(default_factory=dict)  # plan_changes, per run
    failed: dict[str, list[str]] = field(default_factory=dict)  # what ended failed runs
    load_1min: float = 0.0

    @property
    def label(self) -> str:
        return f"{self.shape}-{self.size}"

    def ratios(self, engine: str) -> list[float]:
        """Per timed run; a failed run counts as infinitely slow."""
        return [s / lb for s, lb in zip(self.seconds[engine], self.lower_bounds_s, strict=True)]

    def median_ratio(self, engine: str) -> float:
        return statistics.median(self.ratios(engine))

    def median_window_ratio(self, engine: str) -> float:
        """As :meth:`median_ratio`, against the tighter window bound."""
        pairs = zip(self.seconds[engine], self.window_bounds_s, strict=True)
        return statistics.median(s / bound for s, bound in pairs)

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "median_lower_bound_s": statistics.median(self.lower_bounds_s),
            "median_ratio": {e: self.median_ratio(e) for e in self.seconds},
        }


def result_label(replay: Replay) -> str:
    return f"{replay.shape.name} ({len(replay.shape.tasks)} tasks)"


@dataclass
class Outcome:
    """One run: driver-side seconds (inf: it failed), and for dagkube the makespan its plan
    predicted and the most tasks that ran at once."""

    seconds: float
    predicted_s: float | None = None
    most_at_once: int | None = None
    error: str = ""
    changes: int | None = None  # plan_changes: what the plan changed from its plain start


def run_once(
    engines: Engines, engine: str, replay: Replay, durations: list[float], args: argparse.Namespace
) -> Outcome:
    """One run of ``replay`` on an engine (a planner or Dask)."""
    fn = VARIANTS[args.variant]
    timeout_s = max(60.0, 20 * replay.shape.lower_bound_s(durations, args.workers))
    if engine == DASK:
        graph = build_dask(replay, durations, fn)
        started = time.perf_counter()
        futures = engines.client.compute(graph)
        outputs = engines.client.gather(futures)
        seconds = time.perf_counter() - started
        check_outputs(replay, outputs, engine)
        del futures
        return Outcome(seconds)
    workflow = build_dagkube(replay, durations, fn)
    started = time.perf_counter()
    try:
        outputs = workflow.run(
            engine, "avg", args.classes, runtime=engines.runtime, timeout=timeout_s
        )
    except (RunTimeout, TaskFailed) as exc:  # reported with the shape, not fatal
        print(f"{result_label(replay)} on {engine}: {exc}", flush=True)
        return Outcome(math.inf, error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - started
    check_outputs(replay, outputs, engine)
    history = engines.runtime.call(read_run(engines.runtime.redis, workflow.last_run.run_id))
    spans = [(t.started_at, t.ended_at) for t in history.tasks] if history else []
    plan = workflow.last_plan
    predicted = plan.predicted_makespan_s if plan else None
    changes = plan_changes(plan, engine) if plan else None
    return Outcome(seconds, predicted, most_at_once(spans), changes=changes)


def plain_of(planner: str) -> str | None:
    """The plain plan a planner starts from, which it may change (None: it is one): uniform
    for non-uniform (whose downgrades start from it), X for X-opt (whose marks are added to
    it)."""
    if planner.endswith("-opt"):
        return planner.removesuffix("-opt")
    return "uniform" if planner == "non-uniform" else None


def plan_changes(plan: Any, planner: str) -> int | None:
    """What a non-uniform or -opt plan changed from the plain plan it started from: logical
    workers below the plan's largest class (non-uniform's downgrades; a non-uniform plan
    downgrading every worker would count as none), plus optimization marks on tasks (-opt).
    Zero: the plan is its plain plan, so a gap between the two is run-to-run noise."""
    if plain_of(planner) is None:
        return None
    changes = 0
    if planner.startswith("non-uniform") and plan.workers:
        top = max(w.memory_mib for w in plan.workers)
        changes += sum(1 for w in plan.workers if w.memory_mib < top)
    if planner.endswith("-opt"):
        switched = set(plan.optimizations)
        changes += sum(
            1 for t in plan.tasks.values() for o in t.optimizations if o.name in switched
        )
    return changes


def rotated(items: Sequence[str], by: int) -> list[str]:
    """``items`` starting at position ``by`` (modulo its length), the rest after."""
    k = by % len(items)
    return [*items[k:], *items[:k]]


def most_at_once(spans: list[tuple[float, float]]) -> int:
    """The most intervals that overlap at one time."""
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def measure_shape(engines: Engines, name: str, size: int, args: argparse.Namespace) -> ShapeResult:
    shape = SHAPES[name](size)
    target_s = args.target_s * math.sqrt(max(1.0, size / REFERENCE_TASKS))
    replay = Replay.fitted(shape, target_s, args.bound_workers, args.byte_scale)
    result = ShapeResult(
        name,
        size,
        len(shape.tasks),
        shape.depth,
        shape.edges,
        shape.source,
        replay.time_scale,
        replay.byte_scale,
        sum(replay.output_sizes),
        seconds={e: [] for e in args.engines},
        predicted_s={p: [] for p in args.planners},
        most_at_once={p: [] for p in args.planners},
        failed={e: [] for e in args.engines},
        load_1min=os.getloadavg()[0],
    )
    for index in range(args.warmup):  # history: every planner's plans, equally
        durations = replay.durations(f"{args.seed}:{result.label}:history {index}", args.cv)
        for planner in args.planners:
            run_once(engines, planner, replay, durations, args)
    draws = [replay.durations(f"{args.seed}:{result.label}:{i}", args.cv) for i in range(args.runs)]
    result.lower_bounds_s = [shape.lower_bound_s(d, args.bound_workers) for d in draws]
    result.window_bounds_s = [shape.window_bound_s(d, args.bound_workers) for d in draws]
    turn = len(args.tasks) * args.recipes.index(name) + args.tasks.index(size)
    order = rotated(args.engines, turn)

    def timed(engine: str, durations: list[float]) -> None:
        outcome = run_once(engines, engine, replay, durations, args)
        result.seconds[engine].append(outcome.seconds)
        if outcome.error:
            result.failed[engine].append(outcome.error)
        if outcome.predicted_s is not None:
            result.predicted_s[engine].append(outcome.predicted_s)
        if outcome.most_at_once is not None:
            result.most_at_once[engine].append(outcome.most_at_once)
        if outcome.changes is not None:
            result.changes.setdefault(engine, []).append(outcome.changes)

    if args.interleave:  # every draw: each engine in turn, untimed then timed
        for index, durations in enumerate(draws):
            warm = replay.durations(f"{args.seed}:{result.label}:warm {index}", args.cv)
            for engine in rotated(order, index):
                run_once(engines, engine, replay, warm, args)
                timed(engine, durations)
    else:
        for engine in order:
            # One untimed run first: the engine's own workers (of its classes) are warm.
            run_once(engines, engine, replay, draws[-1], args)
            for durations in draws:
                timed(engine, durations)
    cells = ", ".join(f"{e} {result.median_ratio(e):.2f}x" for e in args.engines)
    print(
        f"{result.label} ({result.tasks} tasks, lower bound "
        f"{statistics.median(result.lower_bounds_s):.2f} s): {cells}",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------- report


def engine_title(engine: str) -> str:
    return "Dask" if engine == DASK else engine


def ratio_cell(result: ShapeResult, engine: str, best: float) -> str:
    median = result.median_ratio(engine)
    text = "failed" if math.isinf(median) else f"{median:.2f}x"
    text = f"**{text}**" if median == best else text
    failed = len(result.failed.get(engine, []))
    return f"{text} ({failed} of {len(result.lower_bounds_s)} failed)" if failed else text


def ratio_table(results: list[ShapeResult], engines: Sequence[str]) -> list[str]:
    """Markdown: one row per shape, the median ratio to the lower bound per engine (the best
    in bold), and the most tasks any dagkube run had running at once."""
    lines = [
        "| shape | tasks | depth | time scale | lower bound | window bound | "
        "dagkube tasks at once | " + " | ".join(engine_title(e) for e in engines) + " |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | "
        + " | ".join("---:" for _ in engines)
        + " |",
    ]
    for r in results:
        best = min(r.median_ratio(e) for e in engines)
        at_once = max((n for runs in r.most_at_once.values() for n in runs), default=0)
        lines.append(
            f"| {r.label} | {r.tasks} | {r.depth} | {r.time_scale:.2g} | "
            f"{statistics.median(r.lower_bounds_s):.2f} s | "
            f"{statistics.median(r.window_bounds_s):.2f} s | {at_once} | "
            + " | ".join(ratio_cell(r, e, best) for e in engines)
            + " |"
        )
    return lines


def findings(results: list[ShapeResult], planners: Sequence[str]) -> list[str]:
    """Per shape: planners more than 5% slower than the best one, and the best against Dask."""
    lines = []
    for r in results:
        medians = {p: r.median_ratio(p) for p in planners}
        best = min(medians, key=medians.__getitem__)
        losers = [
            f"{p} {medians[p]:.2f}x (+{medians[p] / medians[best] - 1:.0%})"
            for p in planners
            if medians[p] > 1.05 * medians[best]
        ]
        dask = r.median_ratio(DASK) if DASK in r.seconds else None
        against = f"; Dask {dask:.2f}x" if dask is not None else ""
        lost = f"; more than 5% slower: {', '.join(losers)}" if losers else ""
        window = ""
        if statistics.median(r.window_bounds_s) > 1.01 * statistics.median(r.lower_bounds_s):
            engines = [e for e in (AUTO, DASK) if e in r.seconds]
            window = "; against the window bound: " + ", ".join(
                f"{engine_title(e)} {r.median_window_ratio(e):.2f}x" for e in engines
            )
        plain = against_plain(r, planners)
        lines.append(
            f"- {r.label}: best planner {best} {medians[best]:.2f}x{against}{lost}{window}{plain}"
        )
    return lines


def against_plain(r: ShapeResult, planners: Sequence[str]) -> str:
    """Each non-uniform or -opt planner against the plain planner it starts from (median
    ratios), with how many of its runs changed the plain plan at all (``plan_changes``)."""
    cells = []
    for planner in planners:
        plain = plain_of(planner)
        if plain is None or plain not in planners:
            continue
        gap = r.median_ratio(planner) / r.median_ratio(plain) - 1
        runs = r.changes.get(planner, [])
        changed = sum(1 for c in runs if c > 0)
        cells.append(
            f"{planner} {gap:+.0%} over {plain} (plan changed in {changed} of {len(runs)} runs)"
        )
    return "; against the plain plan: " + ", ".join(cells) if cells else ""


def markdown_report(results: list[ShapeResult], args: argparse.Namespace) -> str:
    workers = f"{args.workers} workers" + (
        f" ({args.bound_workers} in the bound: this machine's cores)"
        if args.bound_workers != args.workers
        else ""
    )
    loads = ", ".join(f"{r.label} {r.load_1min:.1f}" for r in results)
    lines = [
        "## Real workflow shapes (WfCommons)",
        "",
        "WfCommons 1.6 recipes (Cycles, Seismology, SoyKB, SRASearch, BWA, RNA-seq), generated "
        "once with seed 0 by `benchmarks/wfshapes_generate.py` and kept in `benchmarks/shapes/`, "
        f"replayed on dagkube's LocalRuntime and Dask's LocalCluster with {workers}, one "
        f"thread each, no CPU or memory limits. Variant `{args.variant}`: each task "
        + ("sleeps" if args.variant == "sleep" else "burns CPU")
        + " for its recorded runtime times the shape's time scale times a log-normal factor "
        f"(mean 1, CV {args.cv}; every engine replays the same draws) and returns its "
        "recorded output size times the byte scale (here "
        + ("the time scale" if args.byte_scale is None else f"{args.byte_scale:g}")
        + "), which its children receive. The time scale makes the lower bound of the recorded "
        f"runtimes {args.target_s:g} s x sqrt(size / 100). dagkube plans at SLA avg with "
        f"classes {args.classes}, after {args.warmup} untimed round(s) of every planner (the "
        "planners' history). "
        + (
            f"Then {args.runs} rounds; in each, every engine in turn (the order rotating "
            "round by round) makes one untimed run of another draw (its workers warm) and "
            "one timed run of the round's draw"
            if args.interleave
            else "Then each engine in turn: one untimed run (its workers warm), "
            f"then {args.runs} timed runs"
        )
        + f", the same {args.runs} draws of durations for every engine. Each cell: the "
        "median over those runs of (driver-side time from submission "
        "to outputs) / (the run's lower bound = max(critical path, work / workers) of the "
        "durations drawn): no schedule on that many workers reaches 1.00x. *window bound*: a "
        "tighter lower bound (`Shape.window_bound_s`: each task of a set starts only after its "
        "longest chain of ancestors and must leave time for its longest chain of descendants, "
        "so the set's work fits in the window the set's earliest start and shortest tail "
        "leave), medians; where it is higher, the findings give auto's and Dask's ratios to "
        "it too. *dagkube tasks "
        "at once*: the most tasks any timed dagkube run had running at the same time; "
        "LocalRuntime's worker cap does not count workers blocked waiting for inputs, so this "
        "can exceed the worker count (and a ratio fall below 1.00x).",
        "",
        *ratio_table(results, args.engines),
        "",
        *findings(results, args.planners),
        "",
        f"Load average (1 min) when each shape started: {loads}.",
        "",
        *benchlib.provenance(__file__, args.argv),
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/shapes.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--tasks", default=None, help="sizes, comma-separated (100,1000)")
    parser.add_argument("--recipes", default=",".join(SHAPES), help="shapes, comma-separated")
    parser.add_argument("--planners", default=None, help="dagkube planners, comma-separated")
    parser.add_argument("--runs", type=positive_int, default=None, help="timed rounds (5)")
    parser.add_argument("--warmup", type=positive_int, default=None, help="history rounds (2)")
    parser.add_argument("--workers", type=positive_int, default=4)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="sleep")
    parser.add_argument("--cv", type=float, default=0.3, help="noise on durations (0.3)")
    parser.add_argument("--target-s", type=float, default=None, help="lower bound at 100 (3)")
    parser.add_argument("--byte-scale", type=float, default=None, help="default: time scale")
    parser.add_argument("--classes", default="512Mi,1Gi,2Gi")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--interleave",
        action="store_true",
        help="engines take turns run by run (each timed run after an untimed one of the same "
        "engine, so its classes are warm), instead of five runs in a block per engine: "
        "slow drift of the machine falls on every engine alike; about twice the time",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 100 tasks, 1 round each, 0.5 s"
    )
    parser.add_argument("--json", type=Path, metavar="FILE")
    parser.add_argument("--markdown", type=Path, metavar="FILE")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    quick = args.quick
    try:
        args.tasks = [
            positive_int(t) for t in (args.tasks or ("100" if quick else "100,1000")).split(",")
        ]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(f"--tasks {args.tasks}: {exc} (use sizes such as 100,1000)")
    args.runs = args.runs or (1 if quick else 5)
    args.warmup = args.warmup or (1 if quick else 2)
    args.target_s = args.target_s or (0.5 if quick else 3.0)
    args.recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in args.recipes if r not in SHAPES]
    if unknown or not args.recipes:
        parser.error(f"unknown recipes {unknown}: choose from {', '.join(SHAPES)}")
    if args.planners is None:
        args.planners = [p for p in DEFAULT_PLANNERS if p in PLANNER_NAMES]
    else:
        args.planners = [check_planner(p) for p in args.planners.split(",") if p.strip()]
    if not 0 <= args.cv <= 5 or args.target_s <= 0:
        parser.error(f"--cv {args.cv} must be in [0, 5] and --target-s {args.target_s} > 0")
    args.engines = [*args.planners, DASK]
    cores = os.cpu_count() or 1
    args.bound_workers = min(args.workers, cores) if args.variant == "cpu" else args.workers
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def write_outputs(results: list[ShapeResult], args: argparse.Namespace) -> str:
    """The report (and the JSON), rewritten after every shape: a later failure keeps them."""
    report = markdown_report(results, args)
    if args.json:
        payload = {
            "machine": benchlib.machine_info(),
            "command": benchlib.command_line(__file__, args.argv),
            "options": {k: v for k, v in vars(args).items() if k not in ("json", "markdown")},
            "results": [r.summary() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    if args.markdown:
        benchlib.write_section(args.markdown, "shapes", report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.environ.pop("DAGKUBE_REDIS_URL", None):
        print("DAGKUBE_REDIS_URL is ignored: the benchmark uses a private embedded Redis")
    results: list[ShapeResult] = []
    for size in args.tasks:
        for name in args.recipes:
            # Fresh engines per shape: no shape starts with another's idle workers or history.
            with (
                tempfile.TemporaryDirectory(
                    prefix="dagkube-shapes-", ignore_cleanup_errors=True
                ) as home,
                started_engines(args.workers, Path(home)) as engines,
            ):
                results.append(measure_shape(engines, name, size, args))
            report = write_outputs(results, args)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
