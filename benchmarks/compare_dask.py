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
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import benchlib
import psutil
from dask_engines import Result, console, measure, started_engines, warm_up
from dask_report import (
    OVERHEAD_DEFINITION,
    detail_table,
    markdown_report,
    results_table,
    verdict,
)

import dagkube

if TYPE_CHECKING:
    import numpy as np
    from dask.delayed import Delayed


BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
MATMUL_SEED = 0
TREE_SEED = 42

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
