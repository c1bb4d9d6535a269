"""Do transfer-time predictions match what the workers measure? Measured with the local runtime.

Each case (an example workflow and a planner) runs ``--runs`` times on one LocalRuntime (its own
DAGKUBE_HOME, so its history grows from nothing; workers kept warm between runs; CPU not
enforced), each run planned at SLA avg from the runs before it. A run counts once at least
``--history`` runs were behind its plan. Reported per case, as the report computes it
(:func:`dagkube.report.numbers.prediction_errors`): the median over runs of
|predicted - actual| / actual of the run's transfer time (every task's input download plus
output upload), and the same per part (downloads, uploads) over the tasks that moved bytes.

Cases: ``large_fanin`` (4 x 16 MB into one fan-in) under uniform, uniform-opt (pre-load) and
wukong; ``unequal_branches`` (small values, one fan-out and a fan-in) under wukong and uniform.

The same file measures an older tree too: ``PYTHONPATH=/path/to/clone python
benchmarks/transfers.py`` imports that tree's dagkube (the script uses only long-standing API).

Usage: python benchmarks/transfers.py [--runs 8] [--history 2] [--only CASE,...]
                                      [--markdown F] [--json F]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import benchlib

import dagkube
from dagkube.metrics.history import RunHistory, read_run
from dagkube.planning.model import Plan
from dagkube.report.numbers import prediction_errors

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
CLASS = "1Gi"
WORKERS = 6


@dataclass(frozen=True)
class Case:
    example: str
    planner: str

    @property
    def name(self) -> str:
        return f"{self.example}/{self.planner}"


CASES = [
    Case("large_fanin", "uniform"),
    Case("large_fanin", "uniform-opt"),
    Case("large_fanin", "wukong"),
    Case("unequal_branches", "wukong"),
    Case("unequal_branches", "uniform"),
]


def _parts(plan: Plan, history: RunHistory) -> dict[str, list[dict]]:
    """Per task that moved bytes: its download and its upload, measured against the plan."""
    found: dict[str, list[dict]] = {"download": [], "upload": []}
    for task in history.tasks:
        planned = plan.tasks.get(task.task_id)
        if planned is None:
            continue
        if task.download_bytes:
            found["download"].append(
                {
                    "task": task.task_id,
                    "bytes": task.download_bytes,
                    "actual_s": task.download_s,
                    "predicted_s": planned.predicted_download_s or 0.0,
                }
            )
        if task.output_stored:
            found["upload"].append(
                {
                    "task": task.task_id,
                    "bytes": task.output_bytes,
                    "actual_s": task.upload_s,
                    "predicted_s": planned.predicted_upload_s or 0.0,
                }
            )
    return found


def _load(example: str) -> object:
    spec = importlib.util.spec_from_file_location(
        f"transfers_{example}", EXAMPLES / f"{example}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(case: Case, runs: int, history_runs: int) -> dict:
    module = _load(case.example)
    rows = []
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=WORKERS, enforce=False) as rt,
    ):
        for index in range(runs):
            wf = module.build()  # type: ignore[attr-defined]
            wf.run(case.planner, "avg", CLASS, runtime=rt)
            plan = wf.last_plan
            history = rt.call(read_run(rt.redis, wf.last_run.run_id))
            assert history is not None and plan is not None
            rows.append(
                {
                    "history_runs": index,
                    "transfer_error": prediction_errors(history)["transfer"],
                    "parts": _parts(plan, history),
                }
            )
    scored = [r for r in rows if r["history_runs"] >= history_runs]
    errors = [r["transfer_error"] for r in scored if r["transfer_error"] is not None]
    result = {
        "case": case.name,
        "runs_scored": len(scored),
        "transfer_error": statistics.median(errors) if errors else None,
        "runs": rows,
    }
    for part in ("download", "upload"):
        found = [p for r in scored for p in r["parts"][part] if p["actual_s"] > 0]
        result[f"{part}_error"] = (
            statistics.median(abs(p["predicted_s"] - p["actual_s"]) / p["actual_s"] for p in found)
            if found
            else None
        )
        result[f"{part}s"] = len(found)
    return result


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def markdown(results: list[dict], args: argparse.Namespace, argv: list[str] | None) -> str:
    lines = [
        f"Local runtime, CPU not enforced, up to {WORKERS} workers kept warm, class {CLASS}, "
        f"SLA avg; {args.runs} runs per case with the history growing from none, the runs "
        f"with at least {args.history} runs of history behind their plan scored. Machine load "
        f"(1-minute average) at the end: {os.getloadavg()[0]:.2f}.",
        "",
        "| case | runs scored | transfer error (per run) | download error (per task) | "
        "upload error (per task) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    lines += [
        f"| {r['case']} | {r['runs_scored']} | {_percent(r['transfer_error'])} | "
        f"{_percent(r['download_error'])} ({r['downloads']}) | "
        f"{_percent(r['upload_error'])} ({r['uploads']}) |"
        for r in results
    ]
    every = [
        r["transfer_error"]
        for result in results
        for r in result["runs"]
        if r["history_runs"] >= args.history and r["transfer_error"] is not None
    ]
    if every:
        lines += [
            "",
            f"Median transfer error over all scored runs: {statistics.median(every):.1%}.",
        ]
    lines += ["", *benchlib.provenance(__file__, argv)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--history", type=int, default=2, help="runs of history to score")
    parser.add_argument("--only", default=",".join(c.name for c in CASES), help="cases, by name")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    known = {c.name: c for c in CASES}
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown case(s) {', '.join(unknown)}: use {', '.join(known)}")
    if not 1 <= args.history < args.runs:
        parser.error(f"--history {args.history} must be >= 1 and below --runs {args.runs}")
    results = [measure(known[name], args.runs, args.history) for name in names]
    if args.json:
        args.json.write_text(
            json.dumps({"machine": benchlib.machine_info(), "results": results}, indent=1)
        )
    text = markdown(results, args, argv)
    print(text)
    if args.markdown:
        benchlib.write_section(args.markdown, "transfers", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
