"""dagkube's LocalRuntime against Dask distributed's LocalCluster, side by side on this machine.

Both engines get the same number of single-threaded worker processes (``--workers``, default:
the machine's cores) and run the same four graphs:

* ``fanout-noop``: 1 source -> N no-op tasks (source output + index) -> 1 sink over all N;
* ``tree-L``: pairwise tree reduction (sum) of L leaf values, L - 1 ``add`` tasks;
* ``chain-C``: C tasks, each adding 1 to the previous one's output;
* ``matmul``: chunked numpy matrix multiply (B x B block products + 1 ``np.block`` assembly),
  checked with ``np.allclose`` against ``numpy.matmul``.

Protocol: each engine is started once; every workload runs once untimed on each engine (warm
worker processes); then every workload runs ``--repeat`` times per engine, the engines
alternating (and taking turns going first). A run is timed with ``time.perf_counter()`` from
just before the graph is submitted (dagkube: ``wf.run(runtime=rt)``, which plans and uploads
the DAG; Dask: ``client.compute(graph)``) to the result being back in the driver. Graphs are
built outside the timed region, afresh for every run. Every result is checked.

Reported per workload and engine: the median makespan, the work (pure computation time, run
serially in the driver: 0 for the no-op and add workloads), the per-task overhead, defined as
``(median makespan - work / W) / tasks`` in milliseconds, and the ratio of median makespans
dagkube / Dask (above 1: dagkube is slower).

dagkube always runs on its embedded Redis in a temporary DAGKUBE_HOME (removed at the end;
DAGKUBE_REDIS_URL is ignored), so the benchmark never touches ~/.dagkube or another server.

BLAS is pinned to one thread (OMP/OPENBLAS/MKL_NUM_THREADS=1) in the driver and, by
inheritance, in dagkube's workers, as Dask's nanny does for its workers by default: W workers
then use W cores, and the serial work measured in the driver is single-threaded too.

Usage: python benchmarks/compare_dask.py [--repeat N] [--quick] [--json F] [--markdown F]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import benchlib
import psutil
from rich.console import Console
from rich.table import Table

import dagkube

if TYPE_CHECKING:
    import numpy as np
    from dask.delayed import Delayed
    from distributed import Client

    from dagkube.runtime.local import LocalRuntime

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
DAGKUBE_IDLE_TIMEOUT_S = 3600.0  # warm workers must outlive the whole benchmark
MATMUL_SEED = 0
TREE_SEED = 42
ENGINES = ("dagkube", "dask")

# Piped output (CI logs, tests) gets a width that fits the tables instead of rich's 80.
console = Console(width=None if sys.stdout.isatty() else 160)


# --------------------------------------------------------------------------- task functions
# Plain functions shared by both engines: dagkube wraps them with @task, Dask with delayed.
# Both ship them to their workers with cloudpickle (by value when run as a script).


def source() -> int:
    return 1


def noop(value: int, index: int) -> int:
    return value + index


def sink(values: list[int]) -> int:
    return sum(values)


def add(a: int, b: int) -> int:
    return a + b


def increment(value: int) -> int:
    return value + 1


def multiply(a_rows: np.ndarray, b_cols: np.ndarray) -> np.ndarray:
    return a_rows @ b_cols


def assemble(blocks: list[list[np.ndarray]]) -> np.ndarray:
    import numpy as np  # imported lazily: BLAS threads are pinned before numpy loads

    return np.block(blocks)


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the full benchmark or the --quick smoke test."""

    fanout: int
    tree_leaves: int
    chain: int
    matmul_n: int
    matmul_blocks: int


FULL_SIZES = Sizes(fanout=1000, tree_leaves=1024, chain=200, matmul_n=1024, matmul_blocks=4)
QUICK_SIZES = Sizes(fanout=100, tree_leaves=128, chain=50, matmul_n=256, matmul_blocks=4)


@dataclass
class Workload:
    """One graph, buildable for both engines, with its expected result."""

    name: str
    shape: str
    tasks: int
    build_dagkube: Callable[[], dagkube.Workflow]
    build_dask: Callable[[], Delayed]
    check: Callable[[Any], None]
    work_s: float = 0.0


def expect_equal(expected: Any) -> Callable[[Any], None]:
    def check(result: Any) -> None:
        assert result == expected, f"wrong result: got {result!r}, expected {expected!r}"

    return check


def delayed(fn: Callable[..., Any]) -> Callable[..., Delayed]:
    """``dask.delayed(fn, pure=False)``: every call is its own task (no dedup by arguments)."""
    import dask

    return dask.delayed(fn, pure=False)


def fanout_workload(n: int) -> Workload:
    def build_dagkube() -> dagkube.Workflow:
        root = dagkube.task(source)()
        step = dagkube.task(noop)
        return dagkube.Workflow(dagkube.task(sink)([step(root, i) for i in range(n)]), "fanout")

    def build_dask() -> Delayed:
        root = delayed(source)()
        step = delayed(noop)
        return delayed(sink)([step(root, i) for i in range(n)])

    return Workload(
        name="fanout-noop",
        shape=f"1 -> {n} -> 1",
        tasks=n + 2,
        build_dagkube=build_dagkube,
        build_dask=build_dask,
        check=expect_equal(n * source() + n * (n - 1) // 2),
    )


def tree_workload(leaves: int) -> Workload:
    import random

    rng = random.Random(TREE_SEED)
    values = [rng.randint(1, 1_000) for _ in range(leaves)]

    def build_dagkube() -> dagkube.Workflow:
        return dagkube.Workflow(dagkube.reduce_tree(values, dagkube.task(add)), "tree")

    def build_dask() -> Delayed:
        return dagkube.reduce_tree(values, delayed(add))

    return Workload(
        name=f"tree-{leaves}",
        shape=f"{leaves} leaves, pairwise sum",
        tasks=leaves - 1,
        build_dagkube=build_dagkube,
        build_dask=build_dask,
        check=expect_equal(sum(values)),
    )


def chain_workload(length: int) -> Workload:
    def build_dagkube() -> dagkube.Workflow:
        step = dagkube.task(increment)
        node = step(0)
        for _ in range(length - 1):
            node = step(node)
        return dagkube.Workflow(node, "chain")

    def build_dask() -> Delayed:
        step = delayed(increment)
        node = step(0)
        for _ in range(length - 1):
            node = step(node)
        return node

    return Workload(
        name=f"chain-{length}",
        shape=f"{length} x (+1)",
        tasks=length,
        build_dagkube=build_dagkube,
        build_dask=build_dask,
        check=expect_equal(length),
    )


def matrix_blocks(n: int, blocks: int) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
    """Seeded n x n A and B split into row blocks of A and column blocks of B, and A @ B."""
    import numpy as np

    rng = np.random.default_rng(MATMUL_SEED)
    a, b = rng.standard_normal((n, n)), rng.standard_normal((n, n))
    a_rows = [np.ascontiguousarray(x) for x in np.array_split(a, blocks, axis=0)]
    b_cols = [np.ascontiguousarray(x) for x in np.array_split(b, blocks, axis=1)]
    return a_rows, b_cols, np.matmul(a, b)


def serial_matmul_s(a_rows: list[np.ndarray], b_cols: list[np.ndarray], runs: int = 3) -> float:
    """The pure computation time of the matmul graph, run serially in the driver (median)."""
    multiply(a_rows[0], b_cols[0])  # BLAS warm-up, not timed
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        assemble([[multiply(a_i, b_j) for b_j in b_cols] for a_i in a_rows])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def matmul_workload(n: int, blocks: int) -> Workload:
    import numpy as np

    a_rows, b_cols, expected = matrix_blocks(n, blocks)

    def build_dagkube() -> dagkube.Workflow:
        # Blocks above dagkube's inline budget are uploaded once each, by content hash.
        task = dagkube.task(multiply)
        products = [[task(a_i, b_j) for b_j in b_cols] for a_i in a_rows]
        return dagkube.Workflow(dagkube.task(assemble)(products), "matmul")

    def build_dask() -> Delayed:
        import dask

        # One graph key per block (sent once each), not a copy inlined into every task.
        a_keys = [dask.delayed(a_i, pure=False) for a_i in a_rows]
        b_keys = [dask.delayed(b_j, pure=False) for b_j in b_cols]
        task = delayed(multiply)
        return delayed(assemble)([[task(a_i, b_j) for b_j in b_keys] for a_i in a_keys])

    def check(result: Any) -> None:
        assert isinstance(result, np.ndarray), f"expected an ndarray, got {type(result)}"
        assert result.shape == expected.shape, f"shape {result.shape} != {expected.shape}"
        assert np.allclose(result, expected), "blocked product differs from numpy.matmul"

    return Workload(
        name="matmul",
        shape=f"{n}x{n} float64, {blocks}x{blocks} blocks",
        tasks=blocks * blocks + 1,
        build_dagkube=build_dagkube,
        build_dask=build_dask,
        check=check,
        work_s=serial_matmul_s(a_rows, b_cols),
    )


def make_workloads(sizes: Sizes) -> list[Workload]:
    return [
        fanout_workload(sizes.fanout),
        tree_workload(sizes.tree_leaves),
        chain_workload(sizes.chain),
        matmul_workload(sizes.matmul_n, sizes.matmul_blocks),
    ]


# --------------------------------------------------------------------------- engines


@dataclass
class Sample:
    """One timed run: driver-side wall time, and for dagkube the in-Redis makespan."""

    seconds: float
    engine_makespan_s: float | None = None
    workers_cold: int | None = None


@dataclass
class Engines:
    """The two started engines, sharing this process tree."""

    runtime: LocalRuntime
    client: Client
    workers: int

    def run(self, engine: str, workload: Workload) -> Sample:
        return self.run_dagkube(workload) if engine == "dagkube" else self.run_dask(workload)

    def run_dagkube(self, workload: Workload) -> Sample:
        workflow = workload.build_dagkube()
        started = time.perf_counter()
        result = workflow.run(runtime=self.runtime)
        seconds = time.perf_counter() - started
        workload.check(result)
        record = workflow.last_run.record
        return Sample(seconds, record.makespan_s, record.workers_cold)

    def run_dask(self, workload: Workload) -> Sample:
        graph = workload.build_dask()
        started = time.perf_counter()
        future = self.client.compute(graph)
        result = future.result()
        seconds = time.perf_counter() - started
        workload.check(result)
        del future
        return Sample(seconds)

    def worker_processes(self) -> dict[str, int]:
        return {
            "dagkube": len(self.runtime.worker_pids()),
            "dask": len(self.client.scheduler_info(n_workers=-1)["workers"]),
        }


@contextlib.contextmanager
def started_engines(workers: int, home: Path) -> Iterator[Engines]:
    """dagkube's LocalRuntime (embedded Redis in ``home``) and a Dask LocalCluster."""
    import dask
    from distributed import Client, LocalCluster

    dask.config.set({"optimization.fuse.delayed": False})  # the default, made explicit
    with (
        # Dask's workers have no CPU or memory limits: neither have dagkube's here (with
        # limits, a 1 GiB worker would get 0.57 of a core), so both engines get whole cores.
        dagkube.LocalRuntime(
            home=home, max_workers=workers, idle_timeout_s=DAGKUBE_IDLE_TIMEOUT_S, enforce=False
        ) as runtime,
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield Engines(runtime, client, workers)


# --------------------------------------------------------------------------- measurement


@dataclass
class Result:
    """All samples of one workload, and what is reported about them."""

    workload: str
    shape: str
    tasks: int
    work_s: float
    workers: int
    samples: dict[str, list[Sample]] = field(default_factory=lambda: {e: [] for e in ENGINES})

    def median(self, engine: str) -> float:
        return statistics.median(s.seconds for s in self.samples[engine])

    def overhead_ms(self, engine: str) -> float:
        """(median makespan - work / W) / tasks, in milliseconds."""
        return (self.median(engine) - self.work_s / self.workers) / self.tasks * 1000

    @property
    def ratio(self) -> float:
        return self.median("dagkube") / self.median("dask")

    def dagkube_in_redis_s(self) -> float:
        return statistics.median(s.engine_makespan_s or 0.0 for s in self.samples["dagkube"])

    def dagkube_driver_side_s(self) -> float:
        """Median of (driver-measured makespan - in-Redis makespan) over dagkube's runs."""
        return statistics.median(
            s.seconds - (s.engine_makespan_s or 0.0) for s in self.samples["dagkube"]
        )

    def cold_workers(self) -> int:
        return sum(s.workers_cold or 0 for s in self.samples["dagkube"])

    def summary(self) -> dict[str, Any]:
        return {
            "workload": self.workload,
            "shape": self.shape,
            "tasks": self.tasks,
            "work_s": self.work_s,
            **{f"{e}_median_s": self.median(e) for e in ENGINES},
            **{f"{e}_overhead_ms_per_task": self.overhead_ms(e) for e in ENGINES},
            "ratio_dagkube_over_dask": self.ratio,
            "dagkube_in_redis_median_s": self.dagkube_in_redis_s(),
            "dagkube_driver_side_median_s": self.dagkube_driver_side_s(),
            "dagkube_cold_workers_in_timed_runs": self.cold_workers(),
            "samples": {e: [asdict(s) for s in self.samples[e]] for e in ENGINES},
        }


def warm_up(engines: Engines, workloads: list[Workload]) -> None:
    """One untimed run of every workload on each engine (checked too)."""
    for workload in workloads:
        for engine in ENGINES:
            engines.run(engine, workload)
    console.print(f"warm-up done; worker processes: {engines.worker_processes()}")


def measure(engines: Engines, workloads: list[Workload], repeat: int) -> list[Result]:
    """``repeat`` timed runs per workload and engine, alternating engines (and who goes first)."""
    results = []
    for workload in workloads:
        result = Result(
            workload.name, workload.shape, workload.tasks, workload.work_s, engines.workers
        )
        for index in range(repeat):
            order = ENGINES if index % 2 == 0 else ENGINES[::-1]
            for engine in order:
                result.samples[engine].append(engines.run(engine, workload))
        console.print(
            f"{workload.name:>12}: dagkube {result.median('dagkube'):.3f} s, "
            f"Dask {result.median('dask'):.3f} s (medians of {repeat})"
        )
        results.append(result)
    return results


# --------------------------------------------------------------------------- machine


def machine_info() -> dict[str, Any]:
    import dask
    import distributed
    import numpy

    return {
        **benchlib.machine_info(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "numpy": numpy.__version__,
        "blas_threads": {v: os.environ.get(v) for v in BLAS_THREAD_VARIABLES},
    }


# --------------------------------------------------------------------------- reporting

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
        "four graphs. Each engine is started once and runs every workload once untimed, so "
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
        "asserted: the exact sums for fanout, tree and chain, `np.allclose` against "
        "`numpy.matmul` for matmul.",
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


def print_machine(machine: dict[str, Any]) -> None:
    console.print(
        f"[bold]machine[/]: {machine['cpu']}, {machine['cores_logical']} cores, "
        f"{machine['ram_gib']} GiB RAM; Python {machine['python']}; dagkube "
        f"{machine['dagkube']}, dask {machine['dask']}, distributed {machine['distributed']}, "
        f"numpy {machine['numpy']}; {machine['date']}"
    )


# --------------------------------------------------------------------------- processes


def descendants() -> list[psutil.Process]:
    return psutil.Process().children(recursive=True)


def is_ours_to_stop(proc: psutil.Process) -> bool:
    """redis-server, dagkube workers and Dask worker/nanny processes; not multiprocessing's
    resource tracker, which lives until this process exits."""
    try:
        cmdline = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "resource_tracker" not in cmdline


def running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def leftover_processes(started: list[psutil.Process], timeout_s: float = 10.0) -> list[str]:
    """Processes started during the benchmark and still running after the engines closed."""
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [p for p in started if running(p) and is_ours_to_stop(p)]
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    found = []
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            found.append(f"pid {proc.pid}: {' '.join(proc.cmdline())}")
    return found


# --------------------------------------------------------------------------- main


def pin_blas_threads() -> None:
    """One BLAS thread per process, set before numpy is imported (workers inherit it)."""
    if "numpy" in sys.modules:
        console.print("[yellow]numpy was imported before BLAS threads could be pinned[/]")
    for variable in BLAS_THREAD_VARIABLES:
        os.environ[variable] = "1"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/compare_dask.py",
        description=(
            "Run dagkube's LocalRuntime and Dask's LocalCluster side by side on this machine "
            "(same worker count, warm workers) on four graphs: fanout-noop, tree, chain and "
            "a chunked numpy matmul. Reports median makespans, the per-task overhead "
            "(median makespan - work / W) / tasks in ms, and the dagkube / Dask ratio."
        ),
        epilog=(
            "examples: python benchmarks/compare_dask.py --quick (smoke test, well under a "
            "minute); python benchmarks/compare_dask.py --markdown docs/benchmarks.md "
            "--json results.json (the full benchmark)"
        ),
    )
    parser.add_argument(
        "--repeat",
        type=positive_int,
        default=None,
        metavar="N",
        help="timed runs per workload and engine (default: 5, or 2 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: smaller graphs (fanout 100, tree 128, chain 50, matmul 256) "
        "and 2 repetitions unless --repeat is given",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=max(2, os.cpu_count() or 2),
        metavar="W",
        help="worker processes per engine, one thread each (default: this machine's cores, "
        "at least 2)",
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every sample as JSON")
    parser.add_argument(
        "--markdown",
        type=Path,
        metavar="FILE",
        help="also write the report (tables, method, machine, command) as Markdown, "
        "e.g. docs/benchmarks.md",
    )
    arguments = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(arguments)
    args.command = benchlib.command_line(__file__, arguments)
    if args.repeat is None:
        args.repeat = 2 if args.quick else 5
    return args


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not >= 1")
    return value


def run_benchmark(args: argparse.Namespace, home: Path) -> tuple[list[Result], list[str]]:
    """Start both engines, warm up, measure; returns the results and any leftover process."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    workloads = make_workloads(sizes)
    seen: dict[int, psutil.Process] = {}
    try:
        with started_engines(args.workers, home) as engines:
            try:
                warm_up(engines, workloads)
                seen.update((p.pid, p) for p in descendants())
                results = measure(engines, workloads, args.repeat)
            finally:
                seen.update((p.pid, p) for p in descendants())
    finally:
        leftovers = leftover_processes(list(seen.values()))
    return results, leftovers


def write_outputs(results: list[Result], machine: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        payload = {
            "machine": machine,
            "command": args.command,
            "workers": args.workers,
            "repeat": args.repeat,
            "quick": args.quick,
            "overhead_definition": OVERHEAD_DEFINITION,
            "results": [r.summary() for r in results],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    if args.markdown:
        benchlib.write_section(args.markdown, "dask", markdown_report(results, machine, args))
        console.print(f"wrote {args.markdown}")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    pin_blas_threads()
    if os.environ.pop("DAGKUBE_REDIS_URL", None):
        console.print("DAGKUBE_REDIS_URL is ignored: the benchmark uses a private embedded Redis")
    warnings.filterwarnings("ignore", message=".*[Ll]arge graph.*")
    machine = machine_info()
    print_machine(machine)
    home = Path(tempfile.mkdtemp(prefix="dagkube-bench-"))
    try:
        results, leftovers = run_benchmark(args, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    console.print(results_table(results, args.workers))
    console.print(detail_table(results))
    for line in verdict(results):
        console.print(line)
    write_outputs(results, machine, args)
    if leftovers:
        console.print("[red]processes left running after shutdown:[/]")
        for line in leftovers:
            console.print(f"  {line}")
        return 1
    console.print("process check: no redis-server, dagkube worker or Dask worker left running")
    return 0


if __name__ == "__main__":
    sys.exit(main())
