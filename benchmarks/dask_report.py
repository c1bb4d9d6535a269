"""The report of ``compare_dask.py``: its tables (terminal and Markdown), the verdict lines
and the method and machine sections of docs/benchmarks.md. Pure functions of the measured
results; the measuring stays in ``compare_dask.py``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import benchlib
from dask_engines import console
from rich.table import Table

if TYPE_CHECKING:
    from dask_engines import Result

OVERHEAD_DEFINITION = (
    "per-task overhead = (median makespan - work / W) / tasks, in ms, where W is the number "
    "of workers and work is the serial computation time measured in the driver"
)


def results_table(results: list[Result], workers: int) -> Table:
    table = Table(title=f"dagkube LocalRuntime vs Dask LocalCluster, W = {workers} workers")
    for header in ("workload", "graph", "tasks", "work (s)"):
        table.add_column(header, justify="left" if header in ("workload", "graph") else "right")
    for header in ("dagkube (s)", "Dask (s)", "dagkube ms/task", "Dask ms/task", "dagkube/Dask"):
        table.add_column(header, justify="right")
    for r in results:
        table.add_row(*result_cells(r))
    table.caption = OVERHEAD_DEFINITION + "; makespans are medians."
    return table


def result_cells(r: Result) -> list[str]:
    return [
        r.workload,
        r.shape,
        str(r.tasks),
        f"{r.work_s:.3f}",
        f"{r.median('dagkube'):.3f}",
        f"{r.median('dask'):.3f}",
        f"{r.overhead_ms('dagkube'):.3f}",
        f"{r.overhead_ms('dask'):.3f}",
        f"{r.ratio:.2f}",
    ]


def detail_cells(r: Result) -> list[str]:
    def spread(engine: str) -> str:
        values = [s.seconds for s in r.samples[engine]]
        return f"{min(values):.3f}-{max(values):.3f}"

    return [
        r.workload,
        spread("dagkube"),
        spread("dask"),
        f"{r.dagkube_in_redis_s():.3f}",
        f"{r.dagkube_driver_side_s():.3f}",
        str(r.cold_workers()),
    ]


DETAIL_HEADERS = (
    "workload",
    "dagkube min-max (s)",
    "Dask min-max (s)",
    "dagkube in Redis (s)",
    "dagkube driver-side (s)",
    "dagkube cold starts",
)


def detail_table(results: list[Result]) -> Table:
    table = Table(title="Spread, and where dagkube's time goes")
    for header in DETAIL_HEADERS:
        table.add_column(header, justify="left" if header == "workload" else "right")
    for r in results:
        table.add_row(*detail_cells(r))
    table.caption = (
        "medians over the timed runs. in Redis: submitted -> finished, as the run recorded it; "
        "driver-side: the driver's timing minus that (planning, launch, waking up, fetching "
        "the result)"
    )
    return table


def verdict(results: list[Result]) -> list[str]:
    """Plain sentences: where dagkube is slower than Dask, and where faster."""
    lines = []
    for r in results:
        if r.ratio > 1:
            lines.append(
                f"dagkube is slower than Dask on {r.workload}: {r.ratio:.2f}x Dask's median "
                f"makespan ({r.median('dagkube'):.3f} s vs {r.median('dask'):.3f} s)."
            )
        else:
            lines.append(
                f"dagkube is faster than Dask on {r.workload}: {r.ratio:.2f}x Dask's median "
                f"makespan ({r.median('dagkube'):.3f} s vs {r.median('dask'):.3f} s)."
            )
    return lines


def markdown_table(headers: Sequence[str], rows: list[list[str]], right_from: int = 1) -> str:
    align = ["---" if i < right_from else "---:" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


MAIN_MARKDOWN_HEADERS = (
    "workload",
    "graph",
    "tasks",
    "work (s)",
    "dagkube median (s)",
    "Dask median (s)",
    "dagkube overhead (ms/task)",
    "Dask overhead (ms/task)",
    "dagkube / Dask",
)


def markdown_intro(args: argparse.Namespace) -> str:
    w = args.workers
    return (
        f"This page compares dagkube's `LocalRuntime` with Dask distributed's `LocalCluster`, "
        f"both with W = {w} single-threaded worker processes on the same machine, on the same "
        "graphs. Each engine is started once and runs every workload once untimed, so "
        f"all measured runs use warm workers; each workload then runs {args.repeat} times per "
        "engine, alternating engines, timed from just before the graph is submitted to the "
        "result being back in the driver. Makespans are medians. *Work* is the pure "
        "computation time, measured serially in the driver. The **per-task overhead** is "
        "`(median makespan - work / W) / tasks`, in milliseconds. *dagkube / Dask* is the "
        "ratio of median makespans: above 1, dagkube is slower."
    )


def markdown_method(machine: dict[str, Any], args: argparse.Namespace) -> str:
    blas = ", ".join(f"{k}={v}" for k, v in machine["blas_threads"].items())
    w = args.workers
    points = [
        f"dagkube: `LocalRuntime(max_workers={w}, enforce=False)` on its embedded Redis (a "
        "temporary `DAGKUBE_HOME`), timed around `wf.run(runtime=rt)`, which includes planning and "
        "uploading the DAG; the `Workflow` is built before the timer starts. Its workers run "
        "without cgroup limits, as Dask's do (limited, a 1 GiB worker gets 0.57 of a core).",
        f"Dask: `LocalCluster(n_workers={w}, threads_per_worker=1, processes=True)` and a "
        "`Client`, timed around `client.compute(graph).result()`; the graph is built with "
        "`dask.delayed(fn, pure=False)` before the timer starts (no fusion of delayed tasks, "
        "Dask's default).",
        "Both engines run the same plain Python functions. Graphs are rebuilt for every run "
        "(fresh keys, so no run can reuse a previous run's results) and every result is "
        "asserted: the exact sums for fanout, tree, chain and fan-in, `np.allclose` against "
        "`numpy.matmul` for matmul.",
        "fan-in: P producers each return an M MiB float64 array (`np.full`), one consumer "
        "sums them; every array crosses from its producer's worker to the consumer's (in "
        "dagkube through Redis).",
        "matmul data: dagkube stores each A row block and B column block once (by content "
        "hash) when the run is launched; for Dask each block is one graph key "
        "(`dask.delayed(block)`), also sent once per run. In dagkube every task input and "
        "output goes through Redis; in Dask, between workers.",
        "Work: 0 for the no-op, add and +1 tasks; for matmul the 16 block products and the "
        "`np.block` assembly run serially in the driver (median of 3).",
        f"BLAS runs single-threaded in every process ({blas}), as Dask's nanny sets for its "
        "workers by default; dagkube's workers inherit it from the driver.",
        "Engine order alternates between repetitions. After both engines are closed the "
        "script checks that no redis-server, dagkube worker or Dask worker process it "
        "started is still running.",
    ]
    return "\n".join(f"- {point}" for point in points)


def markdown_report(
    results: list[Result], machine: dict[str, Any], args: argparse.Namespace
) -> str:
    verdict_lines = sorted(verdict(results), key=lambda line: "slower" not in line)
    sections = [
        "## dagkube vs Dask distributed",
        markdown_intro(args),
        markdown_table(MAIN_MARKDOWN_HEADERS, [result_cells(r) for r in results], right_from=2),
        "\n".join(f"- {line}" for line in verdict_lines),
        "### How it is measured",
        markdown_method(machine, args),
        "### Spread, and where dagkube's time goes",
        (
            "Medians over the timed runs. *In Redis* is the run's own makespan (submitted -> "
            "finished, as recorded in Redis); *driver-side* is the driver's timing of the same "
            "run minus it (planning, launch, waking the waiting driver, fetching the record "
            "and the outputs). *Cold "
            "starts* counts worker processes started during timed dagkube runs (0: every "
            "timed run was warm)."
        ),
        markdown_table(DETAIL_HEADERS, [detail_cells(r) for r in results]),
        "### Machine",
        machine_markdown(machine),
        "### Command",
        f"```\n{args.command}\n```",
    ]
    return "\n\n".join(sections) + "\n"


def machine_markdown(machine: dict[str, Any]) -> str:
    blas = ", ".join(f"{k}={v}" for k, v in machine["blas_threads"].items())
    rows = [
        ("CPU", machine["cpu"]),
        ("cores", f"{machine['cores_logical']} logical, {machine['cores_physical']} physical"),
        ("RAM", f"{machine['ram_gib']} GiB"),
        ("OS", machine["os"]),
        ("Python", machine["python"]),
        (
            "versions",
            f"dagkube {machine['dagkube']}, dask {machine['dask']}, "
            f"distributed {machine['distributed']}, numpy {machine['numpy']}",
        ),
        ("BLAS threads", blas),
        ("date", machine["date"]),
    ]
    return "\n".join(f"- **{name}**: {value}" for name, value in rows)


def write_outputs(results: list[Result], machine: dict[str, Any], args: argparse.Namespace) -> None:
    """The ``--json`` samples and the ``--markdown`` section, as the arguments ask."""
    if args.json:
        payload = {
            "machine": machine,
            "command": args.command,
            "workers": args.workers,
            "repeat": args.repeat,
            "quick": args.quick,
            "workloads": list(args.workloads),
            "overhead_definition": OVERHEAD_DEFINITION,
            "results": [r.summary() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.markdown:
        benchlib.write_section(args.markdown, "dask", markdown_report(results, machine, args))
        console.print(f"wrote {args.markdown}")
