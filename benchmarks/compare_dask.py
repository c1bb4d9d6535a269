"""dagkube's LocalRuntime against Dask distributed's LocalCluster, side by side on this machine.

Both engines get the same number of single-threaded worker processes (``--workers``, default:
the machine's cores) and run the same five graphs:

* ``fanout-noop``: 1 source -> N no-op tasks (source output + index) -> 1 sink over all N;
* ``tree-L``: pairwise tree reduction (sum) of L leaf values, L - 1 ``add`` tasks;
* ``chain-C``: C tasks, each adding 1 to the previous one's output;
* ``matmul``: chunked numpy matrix multiply (B x B block products + 1 ``np.block`` assembly),
  checked with ``np.allclose`` against ``numpy.matmul``;
* ``fanin-PxM``: P producers of an M MiB float64 array each -> 1 consumer summing them
  (the data plane: every array crosses from its producer's worker to the consumer's).

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

Usage: python benchmarks/compare_dask.py [--repeat N] [--quick] [--workloads A,B] [--json F]
[--markdown F]
"""

from __future__ import annotations

import argparse
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
from dask_engines import (
    BLAS_THREAD_VARIABLES,
    Result,
    console,
    descendants,
    leftover_processes,
    machine_info,
    measure,
    print_machine,
    started_engines,
    warm_up,
)
from dask_report import (
    detail_table,
    results_table,
    verdict,
    write_outputs,
)

import dagkube

if TYPE_CHECKING:
    import numpy as np
    from dask.delayed import Delayed


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


def produce(index: int, elements: int) -> np.ndarray:
    import numpy as np

    return np.full(elements, float(index + 1))


def reduce_sum(arrays: list[np.ndarray]) -> np.ndarray:
    total = arrays[0].copy()
    for array in arrays[1:]:
        total += array
    return total


# --------------------------------------------------------------------------- workloads


@dataclass(frozen=True)
class Sizes:
    """Workload sizes: the full benchmark or the --quick smoke test."""

    fanout: int
    tree_leaves: int
    chain: int
    matmul_n: int
    matmul_blocks: int
    fanin_producers: int
    fanin_mib: int


FULL_SIZES = Sizes(
    fanout=1000,
    tree_leaves=1024,
    chain=200,
    matmul_n=1024,
    matmul_blocks=4,
    fanin_producers=16,
    fanin_mib=16,
)
QUICK_SIZES = Sizes(
    fanout=100,
    tree_leaves=128,
    chain=50,
    matmul_n=256,
    matmul_blocks=4,
    fanin_producers=16,
    fanin_mib=1,
)


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


def serial_fanin_s(producers: int, elements: int, runs: int = 3) -> float:
    """The pure computation time of the fan-in graph, run serially in the driver (median)."""
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        reduce_sum([produce(i, elements) for i in range(producers)])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def fanin_workload(producers: int, mib: int) -> Workload:
    import numpy as np

    elements = mib * 2**20 // 8
    expected = float(producers * (producers + 1) // 2)

    def build_dagkube() -> dagkube.Workflow:
        task = dagkube.task(produce)
        arrays = [task(i, elements) for i in range(producers)]
        return dagkube.Workflow(dagkube.task(reduce_sum)(arrays), "fanin")

    def build_dask() -> Delayed:
        task = delayed(produce)
        return delayed(reduce_sum)([task(i, elements) for i in range(producers)])

    def check(result: Any) -> None:
        assert isinstance(result, np.ndarray), f"expected an ndarray, got {type(result)}"
        assert result.shape == (elements,), f"shape {result.shape} != ({elements},)"
        assert bool((result == expected).all()), f"the sum is not {expected} everywhere"

    return Workload(
        name=f"fanin-{producers}x{mib}MiB",
        shape=f"{producers} x {mib} MiB float64 -> 1 sum",
        tasks=producers + 1,
        build_dagkube=build_dagkube,
        build_dask=build_dask,
        check=check,
        work_s=serial_fanin_s(producers, elements),
    )


WORKLOAD_KINDS = ("fanout", "tree", "chain", "matmul", "fanin")


def make_workloads(sizes: Sizes, kinds: Sequence[str] = WORKLOAD_KINDS) -> list[Workload]:
    """The workloads of ``kinds`` (built lazily: matmul and fan-in measure their serial work)."""
    builders: dict[str, Callable[[], Workload]] = {
        "fanout": lambda: fanout_workload(sizes.fanout),
        "tree": lambda: tree_workload(sizes.tree_leaves),
        "chain": lambda: chain_workload(sizes.chain),
        "matmul": lambda: matmul_workload(sizes.matmul_n, sizes.matmul_blocks),
        "fanin": lambda: fanin_workload(sizes.fanin_producers, sizes.fanin_mib),
    }
    return [builders[kind]() for kind in kinds]


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
            "(same worker count, warm workers) on five graphs: fanout-noop, tree, chain, "
            "a chunked numpy matmul and a fan-in of numpy arrays. Reports median makespans, "
            "the per-task overhead (median makespan - work / W) / tasks in ms, and the "
            "dagkube / Dask ratio."
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
        help="smoke test: smaller graphs (fanout 100, tree 128, chain 50, matmul 256, "
        "fan-in 16 x 1 MiB) "
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
    parser.add_argument(
        "--workloads",
        type=workload_kinds,
        default=WORKLOAD_KINDS,
        metavar="A,B",
        help=f"the workloads to run, comma-separated (default: all of {','.join(WORKLOAD_KINDS)})",
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


def workload_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    unknown = [k for k in kinds if k not in WORKLOAD_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(
            f"unknown workload(s) {', '.join(unknown) or repr(text)}: choose from "
            f"{', '.join(WORKLOAD_KINDS)}"
        )
    return kinds


def run_benchmark(args: argparse.Namespace, home: Path) -> tuple[list[Result], list[str]]:
    """Start both engines, warm up, measure; returns the results and any leftover process."""
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    workloads = make_workloads(sizes, args.workloads)
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
