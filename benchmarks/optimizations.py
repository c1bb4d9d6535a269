"""Do the optimizations pay off? Each against the same planner without it, runs interleaved,
with the local runtime on this machine and a fresh history per part.

1. prewarm (examples/long_then_wide.py: a 3 s task, then 6 parallel parts): local start-up
   delay of ``--startup-delay`` s, every worker stopped before each run (cold), wukong with
   and without prewarm. Share of requested workers that served the run (the cold starts they
   targets turned warm), median makespan and GB-seconds.
2. preload (examples/large_fanin.py: four 16 MB arrays into one fan-in), uniform with and
   without preload: median input-wait of the fan-in and median makespan.
3. taskdup (examples/straggler.py: an upstream whose first attempt stalls 3 s in every third
   measured run, the same runs in both arms), uniform with and without taskdup: how long the
   consumer waited for its inputs (blocked + input-wait) in the stalled runs and overall,
   median makespan of the stalled runs; outputs equal.

Usage: python benchmarks/optimizations.py [--runs 7] [--startup-delay 2] [--markdown F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import benchlib

import dagkube
from dagkube.metrics.history import read_run

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import large_fanin  # noqa: E402
import long_then_wide  # noqa: E402
import straggler  # noqa: E402

WARMUP_RUNS = 3  # history before measuring (taskdup needs some; all parts get the same)


def _interleaved(
    rt: Any,
    module: Any,
    arms: dict[str, tuple[str, list[str]]],
    sla: str,
    runs: int,
    cold: bool = False,
    build: Callable[[int], Any] | None = None,
) -> dict[str, list[tuple[Any, Any]]]:
    """Run each arm (planner, optimizations) ``runs`` times, interleaved, after warm-up runs
    of each; returns per arm the (outputs, RunHistory) of the measured runs. ``build(i)``
    makes run i's workflow (the same for every arm)."""
    found: dict[str, list[tuple[Any, Any]]] = {arm: [] for arm in arms}
    for index in range(WARMUP_RUNS + runs):
        for arm, (planner, optimizations) in arms.items():
            if cold:
                rt.cool_down()
            wf = build(index - WARMUP_RUNS) if build else module.build()
            outputs = wf.run(planner, sla, runtime=rt, optimizations=optimizations)
            module.verify(outputs)
            if index >= WARMUP_RUNS:
                found[arm].append((outputs, rt.call(read_run(rt.redis, wf.last_run.run_id))))
    return found


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def prewarm(runs: int, startup_delay_s: float) -> dict:
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=10, startup_delay_s=startup_delay_s) as rt,
    ):
        arms = {"wukong": ("wukong", []), "wukong + prewarm": ("wukong", ["prewarm"])}
        found = _interleaved(rt, long_then_wide, arms, "avg", runs, cold=True)
    rows = {}
    for arm, results in found.items():
        records = [h.run for _, h in results]
        rows[arm] = {
            "makespan_s": _median([r.makespan_s or 0.0 for r in records]),
            "gb_s": _median([r.gb_s for r in records]),
            "cold": sum(r.workers_cold for r in records),
            "requested": sum(r.prewarm_requested for r in records),
            "used": sum(r.workers_prewarmed for r in records),
        }
    return rows


def preload(runs: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=5) as rt,
    ):
        arms = {"uniform": ("uniform", []), "uniform + preload": ("uniform", ["preload"])}
        found = _interleaved(rt, large_fanin, arms, "avg", runs)
    rows = {}
    for arm, results in found.items():
        merges = [t for _, h in results for t in h.tasks if t.function == "merge"]
        rows[arm] = {
            "makespan_s": _median([h.run.makespan_s or 0.0 for _, h in results]),
            "input_wait_s": _median([t.input_wait_s for t in merges]),
            "preloaded": sum(len(t.preloaded) for t in merges),
            "preload_s": _median([t.preload_s for t in merges]),
        }
    return rows


def taskdup(runs: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=4) as rt,
    ):
        arms = {"uniform": ("uniform", []), "uniform + taskdup": ("uniform", ["taskdup"])}

        def build(index: int) -> dagkube.Workflow:  # warm-up runs (index < 0) never stall
            return straggler.build(stall=index >= 0 and index % 3 == 1, marker_dir=home)

        # p50: plan for the typical fetch; a mean over history with stalls would expect one
        found = _interleaved(rt, straggler, arms, "p50", runs, build=build)
    rows: dict[str, Any] = {}
    outputs = {arm: {repr(o) for o, _ in results} for arm, results in found.items()}
    for arm, results in found.items():
        waits, stalled_waits, stalled_makespans = [], [], []
        for index, (_, history) in enumerate(results):
            consumer = next(t for t in history.tasks if t.task_id == "analyze#0")
            wait = consumer.blocked_s + consumer.input_wait_s
            waits.append(wait)
            if index % 3 == 1:
                stalled_waits.append(wait)
                stalled_makespans.append(history.run.makespan_s or 0.0)
        rows[arm] = {
            "wait_s": _median(waits),
            "mean_wait_s": statistics.fmean(waits),
            "stalled_runs": len(stalled_waits),
            "stalled_wait_s": _median(stalled_waits),
            "makespan_s": _median(stalled_makespans),
            "duplicated": sum(h.run.tasks_duplicated for _, h in results),
            "won": sum(h.run.duplicates_won for _, h in results),
        }
    rows["outputs_identical"] = len(set.union(*outputs.values())) == 1
    return rows


def _table(title: str, rows: dict[str, dict], columns: dict[str, Callable[[dict], str]]) -> list:
    lines = [f"**{title}**", "", "| | " + " | ".join(columns) + " |"]
    lines.append("| --- |" + " ---: |" * len(columns))
    for arm, row in rows.items():
        if isinstance(row, dict):
            lines.append(f"| {arm} | " + " | ".join(f(row) for f in columns.values()) + " |")
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="measured runs per arm and part")
    parser.add_argument("--startup-delay", type=float, default=2.0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    warmed = prewarm(args.runs, args.startup_delay)
    loaded = preload(args.runs)
    duplicated = taskdup(args.runs)
    with_prewarm = warmed["wukong + prewarm"]
    lines = [
        "## Optimizations: each against the same planner without it",
        "",
        f"Local runtime, {WARMUP_RUNS} warm-up runs per arm then {args.runs} measured runs per "
        "arm, interleaved; medians over the measured runs.",
        "",
    ]
    lines += _table(
        f"prewarm — long_then_wide.py, start-up delay {args.startup_delay:g}s, cold before "
        "each run, up to 10 workers",
        warmed,
        {
            "median makespan": lambda r: f"{r['makespan_s']:.3f}s",
            "median GB-s": lambda r: f"{r['gb_s']:.2f}",
            "cold starts": lambda r: str(r["cold"]),
            "pre-warmed requested / used": lambda r: f"{r['requested']} / {r['used']}",
        },
    )
    share = with_prewarm["used"] / with_prewarm["requested"] if with_prewarm["requested"] else 0
    change = with_prewarm["makespan_s"] / warmed["wukong"]["makespan_s"] - 1
    lines += [
        f"Pre-warmed workers that served the run: **{share:.0%}** of those requested; median "
        f"makespan **{change:+.1%}**. The GB-seconds rise: a pre-warmed worker is charged to "
        "the run from its creation, including the wait before the fan-out.",
        "",
    ]
    lines += _table(
        "preload — large_fanin.py (4 x 16 MB into one fan-in), up to 5 workers",
        loaded,
        {
            "median makespan": lambda r: f"{r['makespan_s']:.3f}s",
            "median fan-in input-wait": lambda r: f"{r['input_wait_s'] * 1000:.1f} ms",
            "inputs pre-loaded": lambda r: str(r["preloaded"]),
            "median background fetch": lambda r: f"{r['preload_s'] * 1000:.1f} ms",
        },
    )
    lines += _table(
        "taskdup — straggler.py (first attempt stalls 3 s in every third run), SLA p50, 4 workers",
        duplicated,
        {
            "consumer wait, median (mean)": lambda r: (
                f"{r['wait_s']:.3f}s ({r['mean_wait_s']:.3f}s)"
            ),
            "runs with a stall": lambda r: str(r["stalled_runs"]),
            "consumer wait in those (median)": lambda r: f"{r['stalled_wait_s']:.3f}s",
            "median makespan of those": lambda r: f"{r['makespan_s']:.3f}s",
            "duplicates run / won": lambda r: f"{r['duplicated']} / {r['won']}",
        },
    )
    lines += [f"Outputs identical across all runs: {duplicated['outputs_identical']}.", ""]
    lines += benchlib.provenance(__file__, argv)
    print("\n".join(lines))
    if args.markdown:
        benchlib.write_section(args.markdown, "optimizations", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
