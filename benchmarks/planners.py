"""Do the planners deliver? Measured with the local runtime on this machine.

1. Prediction accuracy (examples/fanout_sleep.py, known sleeps): 5 runs of history, then
   ``--avg-runs`` runs planned at SLA avg (median absolute error of the predicted makespan)
   and ``--p90-runs`` runs planned at p90 (share that finished within the prediction).
2. Non-uniform vs uniform (examples/unequal_branches.py, classes 512Mi,1Gi,2Gi): the same
   number of interleaved runs each; median GB-seconds and makespan, and their ratios.

Each part uses a fresh DAGKUBE_HOME (its own history) and a LocalRuntime with 2 workers.

Usage: python benchmarks/planners.py [--avg-runs 10] [--p90-runs 20] [--runs 8] [--markdown F]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import benchlib

import dagkube
from dagkube.experiments import run_experiment

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import fanout_sleep  # noqa: E402
import unequal_branches  # noqa: E402


def accuracy(planner: str, avg_runs: int, p90_runs: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=2) as rt,
    ):
        wf = fanout_sleep.build()
        for _ in range(5):
            wf.run(planner, "avg", "1Gi", runtime=rt)
        errors, within = [], 0
        for sla, count in (("avg", avg_runs), ("p90", p90_runs)):
            for _ in range(count):
                planned = wf.plan(planner, sla, "1Gi", runtime=rt)
                wf.run(planner, sla, "1Gi", runtime=rt)
                actual = wf.last_run.record.makespan_s
                if sla == "avg":
                    errors.append(abs(planned.predicted_makespan_s - actual) / actual)
                else:
                    within += actual <= planned.predicted_makespan_s
        return {
            "planner": planner,
            "median_error": statistics.median(errors),
            "max_error": max(errors),
            "p90_within": within,
            "p90_runs": p90_runs,
        }


def non_uniform_vs_uniform(runs: int) -> dict:
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=2) as rt,
    ):
        wf = unequal_branches.build()
        result = run_experiment(
            lambda: wf, rt, ["uniform", "non-uniform"], ["avg"], runs, classes="512Mi,1Gi,2Gi"
        )
    cells = {s.planner: s for s in result.summaries()}
    uniform, non_uniform = cells["uniform"], cells["non-uniform"]
    assert uniform.median_gb_s and non_uniform.median_gb_s
    assert uniform.median_makespan_s and non_uniform.median_makespan_s
    return {
        "runs": runs,
        "uniform_gb_s": uniform.median_gb_s,
        "non_uniform_gb_s": non_uniform.median_gb_s,
        "uniform_makespan_s": uniform.median_makespan_s,
        "non_uniform_makespan_s": non_uniform.median_makespan_s,
        "gb_s_saved": 1 - non_uniform.median_gb_s / uniform.median_gb_s,
        "makespan_change": non_uniform.median_makespan_s / uniform.median_makespan_s - 1,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--avg-runs", type=int, default=10)
    parser.add_argument("--p90-runs", type=int, default=20)
    parser.add_argument("--runs", type=int, default=8, help="runs per planner in part 2")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    rows = [accuracy(p, args.avg_runs, args.p90_runs) for p in ("wukong", "uniform")]
    compared = non_uniform_vs_uniform(args.runs)
    lines = [
        "## Planners: predictions and non-uniform savings",
        "",
        "Local runtime, 2 workers, a fresh history per part. Prediction error = |predicted - "
        "actual| / actual of the run's makespan.",
        "",
        "| planner (fanout_sleep) | median error, SLA avg | max error | p90 runs within "
        "prediction |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['planner']} | {r['median_error']:.1%} | {r['max_error']:.1%} | "
        f"{r['p90_within']}/{r['p90_runs']} ({r['p90_within'] / r['p90_runs']:.0%}) |"
        for r in rows
    ]
    lines += [
        "",
        f"unequal_branches, {compared['runs']} runs each: non-uniform median "
        f"{compared['non_uniform_gb_s']:.3f} GB-s vs uniform (largest class) "
        f"{compared['uniform_gb_s']:.3f} GB-s: **{compared['gb_s_saved']:.0%} fewer GB-s**, "
        f"median makespan {compared['non_uniform_makespan_s']:.3f}s vs "
        f"{compared['uniform_makespan_s']:.3f}s ({compared['makespan_change']:+.1%}).",
    ]
    lines += ["", *benchlib.provenance(__file__, argv)]
    print("\n".join(lines))
    if args.markdown:
        benchlib.write_section(args.markdown, "planners", "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
