"""How long planning takes on large DAGs, per planner (issue: 10,000 tasks well under 1 s,
100,000 in seconds). ``auto`` evaluates several candidates within its own simulation budget
(``planning.choice.AUTO_SIMULATED_TASKS``); its row names the candidate it chose.

The DAG: N/3 independent two-task chains (``leaf -> mid``) reduced by a pairwise tree, so it
has wide fan-in, chains and depth. Planning runs without a worker cap (as on Kubernetes) and
with a history snapshot that has samples for every function, so the predictor, the timing
model and (for non-uniform) the downgrade rounds all do their full work. Building the
Workflow (SDK) is timed separately from planning.

Building one very wide fan-in (one task taking a list of N upstream nodes) is timed too:
it was quadratic in N (issue 18: 200,000 took minutes) and must stay linear.

Usage: python benchmarks/planning_scale.py [--sizes 10000,100000] [--fan-in 200000]
       [--planners auto,...] [--repeat N] [--markdown F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import NamedTuple

import benchlib
from rich.console import Console
from rich.table import Table

import dagkube
from dagkube.planning import PLANNERS, PlanningOptions, plan
from dagkube.planning.history import HistorySnapshot, StartupSample, TaskSample

CLASSES = [512, 1024, 2048]


@dagkube.task
def leaf(i: int) -> int:
    return i


@dagkube.task
def mid(x: int) -> int:
    return x


@dagkube.task
def combine(a: int, b: int) -> int:
    return a + b


@dagkube.task
def gather(values: list[int]) -> int:
    return sum(values)


def build(size: int) -> dagkube.Workflow:
    chains = [mid(leaf(i)) for i in range(size // 3)]
    return dagkube.Workflow(dagkube.reduce_tree(chains, combine), name=f"scale-{size}")


def fan_in_build_s(size: int) -> float:
    """Seconds ``Workflow(...)`` takes for ``size`` leaves gathered by one task (the nodes are
    made before the clock starts: that is the user's code, not the build)."""
    output = gather([leaf(i) for i in range(size)])
    started = time.perf_counter()
    wf = dagkube.Workflow(output, name=f"fan-in-{size}")
    elapsed = time.perf_counter() - started
    assert len(wf.dag.tasks["gather#0"].deps) == size
    return elapsed


def snapshot() -> HistorySnapshot:
    samples = [
        TaskSample(function, memory, 100, 100, seconds)
        for function, seconds in (("leaf", 0.01), ("mid", 0.05), ("combine", 0.02))
        for memory in (1024, 2048)
        for _ in range(5)
    ]
    startups = [
        StartupSample(m, cold, 2.0 if cold else 0.01) for m in CLASSES for cold in (True, False)
    ]
    return HistorySnapshot("bench", 5, samples, startups)


class Row(NamedTuple):
    """One planner on one DAG size: the timings and what the plan uses."""

    tasks: int
    planner: str
    median_s: float
    max_s: float
    build_s: float
    workers: int
    classes_mib: list[int]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="task counts, comma-separated")
    parser.add_argument(
        "--fan-in", type=int, default=200_000, help="upstream nodes of the one fan-in (0: skip)"
    )
    parser.add_argument(
        "--planners", default=",".join(PLANNERS), help="planners to time, comma-separated"
    )
    parser.add_argument("--repeat", type=int, default=3, help="timed plans per size and planner")
    parser.add_argument("--markdown", type=Path, help="write the results into this page")
    return parser.parse_args(argv)


def measure(sizes: list[int], planners: list[str], repeat: int) -> list[Row]:
    """Build each DAG once, then plan it ``repeat`` times with each of ``planners``."""
    history = snapshot()
    rows = []
    for size in sizes:
        started = time.perf_counter()
        wf = build(size)
        build_s = time.perf_counter() - started
        for planner in planners:
            times, result = [], None
            for _ in range(repeat):
                options = PlanningOptions.for_run(CLASSES, history=history)
                started = time.perf_counter()
                result = plan(wf.dag, planner, options)
                times.append(time.perf_counter() - started)
            assert result is not None
            workers = len({t.worker_id for t in result.tasks.values()})
            picked = [a.label for a in result.alternatives if a.chosen]
            rows.append(
                Row(
                    len(wf.dag.tasks),
                    f"{planner} ({picked[0]})" if planner == "auto" else planner,
                    statistics.median(times),
                    max(times),
                    build_s,
                    workers,
                    result.classes_used(),
                )
            )
    return rows


def print_table(rows: list[Row]) -> None:
    table = Table(title="Planning time (median of repeats)")
    for column in (
        "tasks",
        "planner",
        "plan median (s)",
        "plan max (s)",
        "build (s)",
        "logical workers",
        "classes used (MiB)",
    ):
        table.add_column(column)
    for tasks, planner, median, worst, build_s, workers, classes in rows:
        table.add_row(
            f"{tasks:,}",
            planner,
            f"{median:.3f}",
            f"{worst:.3f}",
            f"{build_s:.2f}",
            f"{workers:,}",
            ", ".join(map(str, classes)),
        )
    Console().print(table)


def markdown_section(
    rows: list[Row], args: argparse.Namespace, fan_in_s: float | None, argv: list[str] | None
) -> str:
    """The "planning" section of the benchmarks page, with how it was produced."""
    lines = [
        "## Planning time on large DAGs",
        "",
        "N/3 two-task chains reduced by a pairwise tree; history samples for every "
        "function; no worker cap. *build* is `Workflow(...)` (the SDK), timed apart from "
        f"planning. Median of {args.repeat} plans.",
        "",
        "| tasks | planner | plan median (s) | plan max (s) | build (s) | logical workers "
        "| classes used (MiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    lines += [
        f"| {tasks:,} | {planner} | {median:.3f} | {worst:.3f} | {build_s:.2f} | "
        f"{workers:,} | {', '.join(map(str, classes))} |"
        for tasks, planner, median, worst, build_s, workers, classes in rows
    ]
    if fan_in_s is not None:
        lines += [
            "",
            f"Building a wide fan-in: `Workflow(gather([leaf(i) for i in range(N)]))` with "
            f"N = {args.fan_in:,}, one task over N upstream nodes, takes {fan_in_s:.2f} s "
            "(the nodes made beforehand).",
        ]
    lines += ["", *benchlib.provenance(__file__, argv)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = measure([int(s) for s in args.sizes.split(",")], args.planners.split(","), args.repeat)
    print_table(rows)
    fan_in_s = fan_in_build_s(args.fan_in) if args.fan_in else None
    if fan_in_s is not None:
        Console().print(f"Building one task over {args.fan_in:,} upstream nodes: {fan_in_s:.2f} s")
    if args.markdown:
        benchlib.write_section(
            args.markdown, "planning", markdown_section(rows, args, fan_in_s, argv)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
