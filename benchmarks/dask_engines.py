"""The engines ``compare_dask.py`` runs side by side (dagkube's LocalRuntime and Dask's
LocalCluster, started once, warm) and the timed measurement of a workload on each. The task
functions and workloads stay in ``compare_dask.py``: dagkube's workers get them by value from
the script's ``__main__``."""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import benchlib
import psutil
from rich.console import Console

import dagkube

if TYPE_CHECKING:
    from compare_dask import Workload
    from distributed import Client

    from dagkube.runtime.local import LocalRuntime

BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
DAGKUBE_IDLE_TIMEOUT_S = 3600.0  # warm workers must outlive the whole benchmark
ENGINES = ("dagkube", "dask")
# The benchmark's console (the script prints through it too): piped output (CI logs, tests)
# gets a width that fits the tables instead of rich's 80.
console = Console(width=None if sys.stdout.isatty() else 160)

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
