"""The ``dagkube`` command line.

Exit codes: 0 success; 1 the run failed (a task raised, or the workflow's own ``verify``
rejected the result); 2 bad input (file, option, workflow); 3 Redis unreachable, refused us,
gone past the reconnection grace, or restarted mid-run (the run is then failed); 130
interrupted (Ctrl-C): the run is cancelled and every worker and server it started stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dagkube.errors import (
    DagkubeError,
    InvalidOption,
    InvalidWorkflow,
    RedisUnavailable,
    TaskFailed,
)
from dagkube.loader import WorkflowFileError, load_workflow_file
from dagkube.planning import OPTIMIZATIONS, PLANNER_NAMES, check_optimizations, check_planner
from dagkube.planning.sla import ACCEPTED_SLAS, parse_sla
from dagkube.resources import ACCEPTED_FORMS, format_memory, parse_classes

EXIT_FAILED, EXIT_BAD_INPUT, EXIT_REDIS, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 3, 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM (e.g. from `timeout` or a process manager): stop as Ctrl-C does."""


def _on_sigterm(_signum: int, _frame: object) -> None:
    raise Terminated()


# Piped output is read by tools and tests: never wrap messages, and give tables room.
err = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)

FILE_CONVENTION = """\
FILE is a Python file that defines the workflow in one of two ways:

\b
  workflow = dagkube.Workflow(...)      a module-level Workflow, or
  def build(): return dagkube.Workflow(...)   (or the output task nodes)

It may also define verify(result), called with the outputs after a successful run: raise
(e.g. assert) to reject them. Its directory is importable, so helper modules next to it work.
"""


def describe_value(value: Any, limit: int = 120) -> str:
    """A short description of an output: its repr when small, else its type and size."""
    shape = getattr(value, "shape", None)
    if shape is not None and getattr(value, "size", 0) > 16:  # arrays: never a wall of digits
        return (
            f"<{type(value).__name__}, shape {tuple(shape)}, dtype {getattr(value, 'dtype', '?')}>"
        )
    text = repr(value)
    if len(text) <= limit:
        return text
    size = len(value) if hasattr(value, "__len__") else None
    details = (
        f"shape {tuple(shape)}"
        if shape is not None
        else (f"{size} items" if size is not None else f"{len(text)} chars as text")
    )
    return f"<{type(value).__name__}, {details}>"


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn dagkube errors into one clear line and an exit code, never a traceback (but the
    frames of the user's own code when their workflow file raised)."""
    try:
        yield
    except RedisUnavailable as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_REDIS)
    except (InvalidOption, InvalidWorkflow) as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        if isinstance(exc, WorkflowFileError) and exc.user_frames:
            err.print("In your code (most recent call last):")
            err.print(exc.user_frames.rstrip("\n"), markup=False)
        sys.exit(EXIT_BAD_INPUT)
    except DagkubeError as exc:
        err.print(f"[red]error:[/] {escape(str(exc))}")
        sys.exit(EXIT_FAILED)
    except KeyboardInterrupt as exc:
        stopped_by = "terminated" if isinstance(exc, Terminated) else "interrupted"
        err.print(f"[yellow]{stopped_by}:[/] the run was cancelled and its workers stopped")
        sys.exit(EXIT_TERMINATED if isinstance(exc, Terminated) else EXIT_INTERRUPTED)


def _validated(parse: Any) -> Any:
    """A click callback that parses a value, turning InvalidOption into a usage error."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except InvalidOption as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dagkube")
def main() -> None:
    """dagkube: run planned Python DAG workflows on serverless-style workers.

    Locally, a private Redis is started under $DAGKUBE_HOME (default ~/.dagkube) unless
    DAGKUBE_REDIS_URL or --redis points at one; it keeps the run history that planners
    learn from.
    """
    signal.signal(signal.SIGTERM, _on_sigterm)  # clean up as on Ctrl-C, then exit 143


CLASSES_OPTION = click.option(
    "--classes",
    default=None,
    callback=_validated(parse_classes),
    help=f"Resource classes, comma-separated: {ACCEPTED_FORMS}. [default: 512Mi,1Gi,2Gi]",
)
REDIS_OPTION = click.option(
    "--redis",
    "redis_url",
    envvar="DAGKUBE_REDIS_URL",
    default=None,
    help="Redis URL (redis://[:password@]host:port/db, rediss:// for TLS). "
    "[default: the embedded server; env: DAGKUBE_REDIS_URL]",
)
MAX_WORKERS_OPTION = click.option(
    "--max-workers",
    type=click.IntRange(min=1),
    default=None,
    help="Cap on concurrent local worker processes. [default: number of cores, >= 2]",
)
ENFORCE_OPTION = click.option(
    "--enforce/--no-enforce",
    default=None,
    help="Run each local worker under its class's memory limit and CPU quota (a cgroup per "
    "worker; a worker past its memory is OOM-killed and its task re-run one class up). "
    "[default: where this machine allows it (root, or a delegated cgroup v2 subtree)]",
)


FILE_ARGUMENT = click.argument("file", type=click.Path(dir_okay=False))
PLANNER_OPTION = click.option(
    "--planner",
    default="wukong",
    show_default=True,
    callback=_validated(check_planner),
    help=f"Planner: {', '.join(PLANNER_NAMES)} (-opt: with its optimizations).",
)
OPTIMIZATIONS_OPTION = click.option(
    "--optimizations",
    default="",
    callback=_validated(check_optimizations),
    help="Optimizations to switch on, comma-separated (besides those of an -opt "
    f"planner): {', '.join(OPTIMIZATIONS)}.",
)
SLA_OPTION = click.option(
    "--sla",
    default="avg",
    show_default=True,
    callback=_validated(parse_sla),
    help=f"SLA: {ACCEPTED_SLAS}.",
)
# The metrics endpoint has no authentication: it answers on this machine only unless asked.
METRICS_HOST = "127.0.0.1"


def _metrics_host_option(flag: str) -> Any:
    """The address the metrics endpoint listens on, as ``flag``."""
    return click.option(
        flag,
        "metrics_host",
        default=METRICS_HOST,
        show_default=True,
        metavar="ADDRESS",
        help="Address the metrics endpoint listens on: 127.0.0.1 answers this machine only; "
        "0.0.0.0 (or ::) every interface, for a Prometheus elsewhere.",
    )


def _check_idle_timeout(value: float) -> float:
    """0.1 s to a day; nan and inf are no timeouts (a worker must end some time)."""
    if not 0.1 <= value <= 86400:
        raise InvalidOption(
            f"Idle timeout {value!r} is not valid: use a number of seconds from 0.1 to 86400"
        )
    return value


def _shared_options(function: Any) -> Any:
    """The options ``run`` and ``plan`` share: what to plan with, and where."""
    options = [
        FILE_ARGUMENT,
        PLANNER_OPTION,
        OPTIMIZATIONS_OPTION,
        SLA_OPTION,
        CLASSES_OPTION,
        REDIS_OPTION,
        MAX_WORKERS_OPTION,
        ENFORCE_OPTION,
        click.option(
            "--idle-timeout",
            type=float,
            callback=_validated(_check_idle_timeout),
            default=30.0,
            show_default=True,
            help="Seconds an idle worker waits before it exits (the next start is cold); 0.1 to "
            "86400.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _check_timeout(value: float) -> float:
    """``run --timeout``: accepted as ``Workflow.run(timeout=...)`` accepts it."""
    from dagkube.runtime.launcher import check_timeout  # the runtime loads only when used

    return check_timeout(value)


@main.command(epilog=FILE_CONVENTION)
@_shared_options
@click.option(
    "--timeout",
    type=float,
    default=None,
    callback=_validated(_check_timeout),
    metavar="SECONDS",
    help="Cancel the run after this many seconds (a positive number): it ends recorded as "
    f"cancelled, and the command exits with code {EXIT_FAILED}.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@click.option(
    "--metrics-port",
    type=click.IntRange(min=1, max=65535),
    default=None,
    help="Serve Prometheus metrics (the run history and the live pool) on this port while "
    "the command runs.",
)
@_metrics_host_option("--metrics-host")
def run(
    file: str,
    planner: str,
    optimizations: list[str],
    sla: str,
    classes: list[int] | None,
    redis_url: str | None,
    max_workers: int | None,
    enforce: bool | None,
    idle_timeout: float,
    timeout: float | None,
    as_json: bool,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Run the workflow defined in FILE and print its result and a summary."""
    from dagkube.runtime.launcher import task_failed_from
    from dagkube.runtime.local import LocalRuntime

    with _errors():
        loaded = load_workflow_file(file)
        wf = loaded.workflow
        show_progress = not as_json and err.is_terminal
        with (
            LocalRuntime(
                redis_url, max_workers=max_workers, idle_timeout_s=idle_timeout, enforce=enforce
            ) as rt,
            _progress(show_progress, len(wf.dag.tasks), wf.name) as on_progress,
        ):
            if rt.enforcement_note and enforce is None and not as_json:
                err.print(f"[yellow]note:[/] {rt.enforcement_note}")
            if metrics_port is not None:
                backend = rt.backend
                assert backend is not None and rt.url is not None  # the runtime is started
                _serve_metrics(
                    rt.url,
                    host=metrics_host,
                    port=metrics_port,
                    host_option="--metrics-host",
                    port_option="--metrics-port",
                    pools=[rt.pool],
                    workers_alive=backend.alive,
                )
            chosen = rt.plan(wf.dag, planner, sla, classes, optimizations=optimizations)
            result = rt.run(wf.dag, chosen, timeout_s=timeout, on_progress=on_progress)
        record = result.record
        verified: bool | None = None
        verify_error = ""
        if result.status == "succeeded" and loaded.verify is not None:
            try:
                loaded.verify(result.outputs)
                verified = True
            except Exception as exc:
                verified = False
                verify_error = f"{type(exc).__name__}: {exc}"
        summary = {
            "run_id": result.run_id,
            "workflow": wf.name,
            "status": result.status,
            "planner": record.planner,
            "sla": record.sla,
            "classes": [format_memory(c) for c in chosen.classes_used()],
            "tasks": record.tasks_total,
            "tasks_done": record.tasks_done,
            "makespan_s": record.makespan_s,
            "workers_cold": record.workers_cold,
            "workers_warm": record.workers_warm,
            "workers_lost": record.workers_lost,
            "workers_prewarmed": record.workers_prewarmed,
            "tasks_duplicated": record.tasks_duplicated,
            "optimizations": record.optimizations,
            "gb_s": record.gb_s,
            "cpu_s_allocated": record.cpu_s_allocated,
            "cpu_s_used": record.cpu_s_used,
            "enforced": record.enforced,
            "oom_kills": record.oom_kills,
            "escalations": record.escalations,
            "verified": verified,
        }
        failure = task_failed_from(record) if result.status != "succeeded" else None
        if as_json:
            summary["outputs"] = describe_value(result.outputs) if failure is None else None
            if failure is not None:
                summary["error"] = {
                    "task_id": failure.task_id,
                    "function": failure.function,
                    "exc_type": failure.exc_type,
                    "message": failure.message,
                    "traceback": failure.remote_traceback,
                }
            if verify_error:
                summary["verify_error"] = verify_error
            out.print_json(json.dumps(summary))
        else:
            _print_summary(summary, result.outputs, failure, verify_error)
        if failure is not None or verified is False:
            sys.exit(EXIT_FAILED)


@contextlib.contextmanager
def _progress(enabled: bool, total: int, name: str) -> Iterator[Any]:
    if not enabled:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tasks"),
        TimeElapsedColumn(),
        console=err,
        transient=True,
    ) as progress:
        bar = progress.add_task(name, total=total)
        yield lambda done, _total: progress.update(bar, completed=done)


def _print_summary(summary: dict, outputs: Any, failure: Any, verify_error: str) -> None:
    if failure is not None and failure.exc_type in ("OutOfMemory", "WorkerLost"):
        err.print(f"[red bold]Run {summary['run_id']} {summary['status']}[/]: {failure.message}")
    elif failure is not None:
        err.print(
            f"[red bold]Run {summary['run_id']} {summary['status']}[/]: task "
            f"[bold]{failure.task_id}[/] (function {failure.function}) raised "
            f"{failure.exc_type}: {failure.message}"
        )
        if failure.remote_traceback:
            err.print("Remote traceback (from the worker):", style="bold")
            err.print(failure.remote_traceback.rstrip(), markup=False, highlight=False)
    else:
        out.print(f"[bold]Result:[/] {describe_value(outputs, limit=400)}")
        if summary["verified"] is True:
            out.print("[green]Verified:[/] the workflow's verify() accepted the result")
        elif summary["verified"] is False:
            err.print(f"[red]Verification failed:[/] {verify_error}")
    table = Table(title=f"Run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    makespan = summary["makespan_s"]
    table.add_row("status", summary["status"])
    table.add_row("planner / SLA", f"{summary['planner']} / {summary['sla']}")
    table.add_row("classes", ", ".join(summary["classes"]))
    table.add_row("tasks", f"{summary['tasks_done']} done of {summary['tasks']}")
    table.add_row("makespan", f"{makespan:.3f} s" if makespan is not None else "-")
    lost = f", {summary['workers_lost']} lost" if summary["workers_lost"] else ""
    prewarmed = summary["workers_prewarmed"]
    table.add_row(
        "workers",
        f"{summary['workers_cold']} cold, {summary['workers_warm']} warm"
        + (f" ({prewarmed} pre-warmed)" if prewarmed else "")
        + lost,
    )
    if summary["optimizations"]:
        duplicated = summary["tasks_duplicated"]
        table.add_row(
            "optimizations",
            ", ".join(summary["optimizations"])
            + (f"; {duplicated} task(s) duplicated" if duplicated else ""),
        )
    if summary["oom_kills"]:
        table.add_row(
            "memory",
            f"{summary['oom_kills']} worker(s) OOM-killed, {summary['escalations']} re-run one "
            "class up",
        )
    table.add_row(
        "limits",
        "memory and CPU enforced per worker" if summary["enforced"] else "not enforced",
    )
    table.add_row("GB-seconds", f"{summary['gb_s']:.3f}")
    table.add_row(
        "CPU-seconds",
        f"{summary['cpu_s_used']:.3f} used of {summary['cpu_s_allocated']:.3f} allocated",
    )
    out.print(table)


@main.command(epilog=FILE_CONVENTION)
@_shared_options
@click.option("--json", "as_json", is_flag=True, help="Print the whole Plan as JSON on stdout.")
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also draw the plan (Graphviz): .svg, .png or .pdf, or .dot for the DOT text.",
)
def plan(
    file: str,
    planner: str,
    optimizations: list[str],
    sla: str,
    classes: list[int] | None,
    redis_url: str | None,
    max_workers: int | None,
    enforce: bool | None,
    idle_timeout: float,
    as_json: bool,
    output: str | None,
) -> None:
    """Plan the workflow in FILE from its run history, without running it: a table per
    worker (class, CPU, tasks, predicted busy period, cold or warm) and the run totals."""
    from dagkube import planning
    from dagkube.metrics.history import load_snapshot
    from dagkube.resources import cpu_for_memory
    from dagkube.runtime import cgroups
    from dagkube.runtime.local_backend import default_max_workers

    with _errors():
        wf = load_workflow_file(file).workflow
        history = _with_redis(redis_url, lambda r: load_snapshot(r, wf.structure_hash))
        # Planned for the local runtime without starting one: its worker cap, and CPU-limited
        # where its workers would be; no warm pool (no workers are running).
        options = planning.PlanningOptions.for_run(
            classes or None,
            sla=sla,
            history=history,
            max_workers=max_workers or default_max_workers(),
            idle_timeout_s=idle_timeout,
            cpu_enforced=enforce if enforce is not None else cgroups.detect() is not None,
            optimizations=optimizations,
        )
        result = planning.plan(wf.dag, planner, options)
        if output:
            _draw(wf.dag, result, Path(output))
        if as_json:
            out.print_json(result.model_dump_json())
            return
        table = Table(title=f"Plan of {wf.name!r}: {planner}, SLA {result.sla}")
        for column in ("worker", "class", "CPU", "tasks", "busy from", "busy to", "start"):
            table.add_column(column, justify="left" if column == "worker" else "right")
        for number, worker in enumerate(result.workers):
            cpu = cpu_for_memory(worker.memory_mib, result.memory_per_cpu_mib, result.max_cpu)
            table.add_row(
                worker.logical_id or f"flexible #{number}",
                format_memory(worker.memory_mib),
                f"{cpu:.2f}",
                str(worker.tasks),
                f"{worker.predicted_start_s:.3f}s",
                f"{worker.predicted_end_s:.3f}s",
                "pre-warmed" if worker.prewarmed else "cold" if worker.cold else "warm",
            )
        out.print(table)
        for task_id, task in result.tasks.items():
            for entry in task.optimizations:
                out.print(f"[bold]{entry.name}[/] {task_id}: {_describe_params(entry.params)}")
        critical = [t for t, p in result.tasks.items() if p.critical_path]
        out.print(
            f"[bold]predicted makespan[/] {result.predicted_makespan_s:.3f}s  "
            f"[bold]GB-seconds[/] {result.predicted_gb_s:.3f}  "
            f"[bold]history[/] {result.history_runs} runs, {result.history_samples} samples"
        )
        out.print(
            f"[bold]critical path[/] ({len(critical)} tasks): {' -> '.join(critical[:12])}"
            + (" ..." if len(critical) > 12 else "")
        )
        for note in result.notes:
            out.print(f"[dim]note:[/] {note}")


@main.command(epilog=FILE_CONVENTION)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--planners",
    default="wukong,uniform,non-uniform",
    show_default=True,
    help=f"Planners to compare, comma-separated: {', '.join(PLANNER_NAMES)}.",
)
@click.option(
    "--slas",
    default="avg,p90,p95,p99",
    show_default=True,
    help=f"SLAs to plan for, comma-separated: {ACCEPTED_SLAS}.",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=3,
    show_default=True,
    help="Runs per (planner, SLA); the matrix is interleaved across repeats.",
)
@CLASSES_OPTION
@click.option("--cold", is_flag=True, help="Stop every idle worker before each run.")
@REDIS_OPTION
@MAX_WORKERS_OPTION
@click.option(
    "--startup-delay",
    type=click.FloatRange(min=0),
    default=0.0,
    show_default=True,
    help="Extra seconds per worker start, so local cold starts cost what Pods do.",
)
@ENFORCE_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print every sample and summary as JSON.")
def experiment(
    file: str,
    planners: str,
    slas: str,
    repeat: int,
    classes: list[int] | None,
    cold: bool,
    redis_url: str | None,
    max_workers: int | None,
    startup_delay: float,
    enforce: bool | None,
    as_json: bool,
) -> None:
    """Run FILE over a matrix of planners and SLAs and compare them: median makespan,
    GB-seconds, warm/cold starts, prediction error and SLA attainment (the share of runs
    that finished within their predicted makespan). Every run is kept in the history."""
    from dagkube.experiments import check_matrix, run_experiment
    from dagkube.runtime.local import LocalRuntime

    with _errors():
        chosen, levels = check_matrix(_split(planners), _split(slas))
        loaded = load_workflow_file(file)  # a bad file fails before anything starts
        total = len(chosen) * len(levels) * repeat
        done = [0]
        with (
            LocalRuntime(
                redis_url,
                max_workers=max_workers,
                startup_delay_s=startup_delay,
                enforce=enforce,
            ) as rt,
            _progress(not as_json and err.is_terminal, total, "experiment") as progress,
        ):

            def on_sample(_sample: Any) -> None:
                done[0] += 1
                if progress:
                    progress(done[0], total)

            result = run_experiment(
                loaded.build,
                rt,
                chosen,
                levels,
                repeat,
                classes=classes,
                cold=cold,
                on_sample=on_sample,
                verify=loaded.verify,
            )
        rejected = [s for s in result.samples if s.verify_error]
        if as_json:
            out.print_json(json.dumps(result.to_dict()))
        else:
            out.print(_experiment_table(result, f"Experiment: {total} runs of {Path(file).name}"))
        if rejected:
            first = rejected[0]
            err.print(
                f"[red]verify() rejected the outputs of {len(rejected)} of "
                f"{len(result.samples)} runs[/red] (first: run {first.run_id}, {first.planner} "
                f"{first.sla}: {first.verify_error})"
            )
            raise SystemExit(1)


def _experiment_table(result: Any, title: str) -> Table:
    table = Table(title=title)
    for column in (
        "planner",
        "SLA",
        "runs",
        "median makespan",
        "median GB-s (+unused)",
        "cold/warm (pre-warmed)",
        "median pred. error",
        "within prediction",
        "optimizations per run (median)",
    ):
        table.add_column(column, justify="left" if column in ("planner", "SLA") else "right")
    for s in result.summaries():
        table.add_row(
            s.planner,
            s.sla,
            f"{s.runs}" + (f" ({s.failed} failed)" if s.failed else ""),
            _fmt(s.median_makespan_s, "{:.3f}s"),
            _fmt(s.median_gb_s, "{:.3f}")
            + (f" (+{s.median_unused_gb_s:.2f})" if s.median_unused_gb_s else ""),
            f"{s.workers_cold}/{s.workers_warm} ({s.workers_prewarmed})",
            _fmt(s.median_prediction_error, "{:.1%}"),
            _fmt(s.sla_attainment, "{:.0%}"),
            ", ".join(f"{n} {c:g}" for n, c in s.median_optimizations.items() if c)
            + (f"; {s.tasks_duplicated} dup run(s)" if s.tasks_duplicated else "")
            or "-",
        )
    return table


def _describe_params(params: dict[str, Any]) -> str:
    parts = []
    for key, value in params.items():
        if isinstance(value, list):
            shown = ", ".join(map(str, value[:4])) + (" ..." if len(value) > 4 else "")
            parts.append(f"{key} [{shown}]")
        else:
            parts.append(f"{key} {value}")
    return "; ".join(parts)


def _draw(dag: Any, result: Any, path: Path) -> None:
    """Write the plan's picture; formats other than .dot need Graphviz's ``dot``."""
    import shutil
    import subprocess

    from dagkube.planning.dot import plan_to_dot

    text = plan_to_dot(dag, result)
    fmt = path.suffix.lstrip(".").lower()
    if fmt == "dot":
        path.write_text(text)
        return
    if fmt not in ("svg", "png", "pdf"):
        raise InvalidOption(f"Cannot draw {str(path)!r}: use a .svg, .png, .pdf or .dot file")
    dot = shutil.which("dot")
    if dot is None:
        raise InvalidOption(
            "Drawing needs Graphviz's 'dot' (Debian: apt-get install graphviz); "
            f"or write the DOT text with -o {path.with_suffix('.dot')}"
        )
    done = subprocess.run(
        [dot, f"-T{fmt}", "-o", str(path)], input=text, text=True, capture_output=True, timeout=120
    )
    if done.returncode != 0:
        raise InvalidOption(f"Graphviz failed to draw {str(path)!r}: {done.stderr.strip()}")
    err.print(f"wrote {path}")


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)


@main.group(invoke_without_command=True)
@click.option("--workflow", "workflow_name", default=None, help="Only runs of this workflow.")
@click.option("--limit", type=click.IntRange(min=1), default=20, show_default=True)
@REDIS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the runs as JSON on stdout.")
@click.pass_context
def history(
    ctx: click.Context,
    workflow_name: str | None,
    limit: int,
    redis_url: str | None,
    as_json: bool,
) -> None:
    """List past runs (most recent first) from the run history, with the highest peak memory
    of each run's tasks and its OOM kills; `dagkube history prune` removes runs.

    By default the history keeps the last 100 runs per workflow structure and the 1000 most
    recently run structures, and drops a structure not run for 90 days (docs/architecture.md).
    """
    if ctx.invoked_subcommand is not None:
        return
    from dagkube.metrics.history import list_runs
    from dagkube.report import mib_text

    with _errors():
        runs = _with_redis(redis_url, lambda r: list_runs(r, workflow=workflow_name, limit=limit))
        if as_json:
            out.print_json(json.dumps([r.model_dump() for r in runs]))
            return
        if not runs:
            which = f" of workflow {workflow_name!r}" if workflow_name else ""
            out.print(f"No runs{which} in the history yet.")
            return
        table = Table(title="Run history (most recent first)")
        for column in (
            "run",
            "workflow",
            "planner",
            "SLA",
            "status",
            "tasks",
            "makespan",
            "cold/warm",
            "GB-s",
            "peak mem",
            "submitted",
        ):
            table.add_column(column, justify="right" if column in {"tasks", "GB-s"} else "left")
        for r in runs:
            oom = f", [red]{r.oom_kills} OOM kill(s)[/]" if r.oom_kills else ""
            style = {"succeeded": "green", "failed": "red"}.get(r.status, "yellow")
            table.add_row(
                r.run_id,
                r.workflow,
                r.planner,
                r.sla,
                f"[{style}]{r.status}[/]",
                f"{r.tasks_done}/{r.tasks_total}",
                f"{r.makespan_s:.3f}s" if r.makespan_s is not None else "-",
                f"{r.workers_cold}/{r.workers_warm}",
                f"{r.gb_s:.3f}",
                mib_text(r.peak_memory_bytes) + oom,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.submitted_at)),
            )
        out.print(table)


def _check_days(value: float) -> float:
    """A number of days from 0 to 100 years (nan and inf are refused: no date is that old)."""
    if not 0 <= value <= 36500:
        raise InvalidOption(f"{value!r} days is not valid: use a number of days from 0 to 36500")
    return value


@history.command("prune")
@click.option(
    "--keep-runs",
    type=click.IntRange(min=0),
    default=None,
    help="Keep this many most recent runs per workflow structure; remove the older ones.",
)
@click.option(
    "--older-than",
    "older_than_days",
    type=float,
    callback=_validated(_check_days),
    default=None,
    help="Remove runs that finished more than this many days ago (e.g. 30, 0.5).",
)
@click.option("--workflow", "workflow_name", default=None, help="Only runs of this workflow.")
@click.option("--dry-run", is_flag=True, help="Print what would be removed; remove nothing.")
@REDIS_OPTION
def history_prune(
    keep_runs: int | None,
    older_than_days: float | None,
    workflow_name: str | None,
    dry_run: bool,
    redis_url: str | None,
) -> None:
    """Remove runs from the run history: those beyond --keep-runs per workflow structure and
    those older than --older-than days (either or both). A run's records and every index
    entry naming it go in one atomic step; index entries naming runs whose records are gone
    go too. Prints what it removed."""
    from dagkube.metrics.history import prune_history

    with _errors():
        if keep_runs is None and older_than_days is None:
            raise InvalidOption(
                "history prune: nothing to prune; give --keep-runs N (runs kept per workflow "
                "structure, N >= 0) and/or --older-than DAYS (days since a run finished, >= 0)"
            )
        before = None if older_than_days is None else time.time() - older_than_days * 86400
        report = _with_redis(
            redis_url,
            lambda r: prune_history(
                r,
                keep_runs=keep_runs,
                finished_before=before,
                workflow=workflow_name,
                dry_run=dry_run,
            ),
        )
        verb = "Would remove" if dry_run else "Removed"
        if report.removed:
            table = Table(title=f"{verb} {len(report.removed)} run(s) (oldest first)")
            for column in ("run", "workflow", "status", "finished"):
                table.add_column(column)
            for run in report.removed:
                finished = time.localtime(run.finished_at)
                table.add_row(
                    run.run_id,
                    run.workflow,
                    run.status,
                    time.strftime("%Y-%m-%d %H:%M:%S", finished),
                )
            out.print(table)
        would = "would be " if dry_run else ""
        out.print(
            f"{verb} {len(report.removed)} run(s), {report.runs_kept} kept. Workflow structures "
            f"left without runs {would}dropped: {len(report.structures_emptied)}. Runs whose "
            f"records were already gone {would}unindexed: {len(report.missing)}."
        )


def _with_redis(redis_url: str | None, action: Any) -> Any:
    """Run ``action(redis)`` against the configured Redis (the embedded one by default)."""
    from dagkube.runtime.connection import connect
    from dagkube.runtime.embedded import EmbeddedRedis

    async def go(url: str) -> Any:
        client = await connect(url)
        try:
            return await action(client)
        finally:
            await client.aclose()

    if redis_url:
        return asyncio.run(go(redis_url))
    with EmbeddedRedis() as url:
        return asyncio.run(go(url))


def _parse_since(value: str | None) -> float | None:
    """``7d``/``12h``/``30m``, a date ``2026-11-01``, or epoch seconds; None: no limit."""
    if value is None:
        return None
    text = value.strip()
    units = {"d": 86400, "h": 3600, "m": 60}
    try:
        if text[-1:] in units and text[:-1].replace(".", "", 1).isdigit():
            return time.time() - float(text[:-1]) * units[text[-1]]
        if len(text) == 10 and text[4] == "-" and text[7] == "-":
            return time.mktime(time.strptime(text, "%Y-%m-%d"))
        return float(text)
    except ValueError:
        pass
    raise InvalidOption(
        f"--since {value!r} is not understood: use a duration (7d, 12h, 30m), a date "
        "(2026-11-01) or Unix seconds"
    )


@main.command()
@click.option("--workflow", "workflow_name", default=None, help="Only runs of this workflow.")
@click.option("--since", default=None, help="Only runs submitted since: 7d, 12h, 2026-11-01.")
@click.option("--run", "run_id", default=None, help="The run shown in detail [default: latest].")
@click.option("--limit", type=click.IntRange(min=1), default=500, show_default=True)
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), default="report.html", show_default=True
)
@REDIS_OPTION
def report(
    workflow_name: str | None,
    since: str | None,
    run_id: str | None,
    limit: int,
    output: str,
    redis_url: str | None,
) -> None:
    """Write an HTML report (one file, opens offline) from the run history: planners side by
    side, optimization impact, prediction accuracy over time, SLA impact, one run in detail."""
    from dagkube.report import load_histories, render

    with _errors():
        start = _parse_since(since)
        histories = _with_redis(
            redis_url,
            lambda r: load_histories(r, workflow=workflow_name, since=start, limit=limit),
        )
        if run_id and not any(h.run.run_id == run_id for h in histories):
            raise InvalidOption(f"--run {run_id!r}: no such run in the selected history")
        Path(output).write_text(render(histories, run_id=run_id), encoding="utf-8")
        what = f"{len(histories)} runs" if histories else "no runs in the history yet"
        err.print(f"wrote {output} ({what})")


def _serve_metrics(
    redis_url: str,
    *,
    host: str,
    port: int,
    host_option: str,
    port_option: str,
    pools: list[str] | None = None,
    workers_alive: Any = None,
) -> Any:
    """Start the Prometheus exporter on ``host``:``port`` (daemon threads: it serves until the
    command exits). Redis must answer first; an address that is not this machine's, or a
    taken port, is bad input named by its option (``host_option``, ``port_option``)."""
    import errno
    import socket

    import redis as sync_redis
    from prometheus_client import CollectorRegistry, start_http_server

    from dagkube.metrics.exporter import RunHistoryCollector
    from dagkube.runtime.connection import redact, sync_client

    try:
        client = sync_client(redis_url)
        client.ping()
    except (ValueError, sync_redis.RedisError, OSError) as exc:
        raise RedisUnavailable(
            f"Cannot read the run history at {redact(redis_url)}: {exc}"
        ) from None
    registry = CollectorRegistry()
    registry.register(RunHistoryCollector(client, pools or [], workers_alive=workers_alive))
    try:
        return start_http_server(port, addr=host, registry=registry)
    except OSError as exc:
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise InvalidOption(
                f"{host_option} {host!r}: cannot listen there ({exc.strerror}); use 127.0.0.1, "
                "0.0.0.0 (every interface) or the address of one of this machine's interfaces"
            ) from None
        raise InvalidOption(
            f"{port_option} {port}: cannot listen there on {host} ({exc.strerror})"
        ) from None


@main.group()
def metrics() -> None:
    """Prometheus metrics of the run history (see docs/metrics.md)."""


@metrics.command("serve")
@click.option(
    "--port",
    type=click.IntRange(min=1, max=65535),
    default=9464,
    show_default=True,
    help="Port of the /metrics endpoint.",
)
@_metrics_host_option("--host")
@REDIS_OPTION
def metrics_serve(port: int, metrics_host: str, redis_url: str | None) -> None:
    """Serve /metrics for the run history of a Redis until interrupted (Ctrl-C).

    Each scrape folds in the runs it has not seen yet; the live state of worker pools
    (queue depth, workers by state) comes from `dagkube run --metrics-port` and the
    operator, which own pools.
    """
    from dagkube.runtime.embedded import EmbeddedRedis

    with _errors(), contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(EmbeddedRedis())
        server, thread = _serve_metrics(
            url, host=metrics_host, port=port, host_option="--host", port_option="--port"
        )
        shown = f"[{metrics_host}]" if ":" in metrics_host else metrics_host
        err.print(f"serving Prometheus metrics on http://{shown}:{port}/metrics (Ctrl-C stops)")
        try:
            while thread.is_alive():
                thread.join(3600)
        except KeyboardInterrupt:
            err.print("stopped")
        finally:
            server.shutdown()
            server.server_close()


# ---------------------------------------------------------------------------- Kubernetes
KUBE_API_OPTION = click.option(
    "--kube-api-url",
    envvar="DAGKUBE_KUBE_API_URL",
    default=None,
    help="Kubernetes API URL without credentials (e.g. `kubectl proxy`'s). "
    "[default: in-cluster credentials, else the kubeconfig; env: DAGKUBE_KUBE_API_URL]",
)
NAMESPACE_OPTION = click.option(
    "-n", "--namespace", default="default", show_default=True, help="Namespace of the Workflow."
)


def _workflow_options(function: Any) -> Any:
    """What a Workflow's spec says besides its source (``submit`` and ``manifest``)."""
    options = [
        FILE_ARGUMENT,
        NAMESPACE_OPTION,
        PLANNER_OPTION,
        OPTIMIZATIONS_OPTION,
        SLA_OPTION,
        CLASSES_OPTION,
        click.option("--image", default=None, help="Worker image [default: the operator's]."),
        click.option(
            "--max-workers",
            type=click.IntRange(min=1),
            default=None,
            help="Cap on the run's worker Pods [default: the operator's].",
        ),
        click.option(
            "--timeout",
            type=click.IntRange(min=1),
            default=None,
            help="Seconds before the operator cancels the run (spec.timeoutSeconds). "
            "[default: the operator's, 3600 unless its chart sets operator.defaultTimeoutSeconds]",
        ),
        click.option(
            "--retries",
            type=click.IntRange(min=0, max=10),
            default=None,
            help="Retries of every task that declares fewer (spec.retries).",
        ),
        click.option(
            "--ttl",
            type=click.IntRange(min=0),
            default=None,
            help="Seconds after the end before the Workflow (Pods, keys) is deleted.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function


@main.command(epilog=FILE_CONVENTION)
@_workflow_options
@click.option(
    "--name",
    default=None,
    help="metadata.name [default: the workflow's name and a random suffix, e.g. "
    "tree-reduction-x7k2p: each apply starts a new run].",
)
def manifest(
    file: str,
    namespace: str,
    planner: str,
    optimizations: list[str],
    sla: str,
    classes: list[int] | None,
    image: str | None,
    max_workers: int | None,
    timeout: int | None,
    retries: int | None,
    ttl: int | None,
    name: str | None,
) -> None:
    """Print the Workflow manifest (YAML) that runs FILE on Kubernetes, its source inline.

    FILE is built here first, so a file that does not define a workflow is reported now, not
    by the operator. The inline source must be self-contained (helper modules next to FILE
    are not part of it; put them in the worker image and use the module form instead).
    Without -n the manifest names no namespace, so kubectl puts it in its own (its -n, or the
    current context's).

    \b
      dagkube manifest pipeline.py -n jobs --planner non-uniform --sla p95 | kubectl apply -f -
      dagkube manifest pipeline.py | kubectl apply -n jobs -f -
    """
    import secrets

    from dagkube.kubernetes.submit import name_stem, workflow_manifest

    source = click.get_current_context().get_parameter_source("namespace")
    if source is click.core.ParameterSource.DEFAULT:
        namespace = ""

    with _errors():
        loaded = load_workflow_file(file)
        # A name, not generateName: `kubectl apply` refuses generateName.
        suffix = "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        body = workflow_manifest(
            source={"inline": Path(file).read_text(encoding="utf-8")},
            name=name or name_stem(loaded.workflow.name) + suffix,
            namespace=namespace,
            planner=planner,
            sla=sla,
            optimizations=optimizations,
            classes_mib=classes,
            max_workers=max_workers,
            image=image,
            timeout_s=timeout,
            retries=retries,
            ttl_after_finished_s=ttl,
        )
        out.print(_yaml(body), end="", markup=False, highlight=False, soft_wrap=True)


def _yaml(body: dict[str, Any]) -> str:
    """YAML with multi-line strings (inline sources) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(body, Dumper=Dumper, sort_keys=False, allow_unicode=True)


@main.command(epilog=FILE_CONVENTION)
@_workflow_options
@REDIS_OPTION
@KUBE_API_OPTION
@click.option("--wait", is_flag=True, help="Follow the Workflow to its end; print the outputs.")
@click.option(
    "--wait-timeout",
    type=click.FloatRange(min=0.1),
    default=None,
    help="With --wait: give up waiting after this many seconds (the run goes on).",
)
def submit(
    file: str,
    namespace: str,
    planner: str,
    optimizations: list[str],
    sla: str,
    classes: list[int] | None,
    image: str | None,
    max_workers: int | None,
    timeout: int | None,
    retries: int | None,
    ttl: int | None,
    redis_url: str | None,
    kube_api_url: str | None,
    wait: bool,
    wait_timeout: float | None,
) -> None:
    """Run FILE on Kubernetes: store its DAG in the operator's Redis and create a Workflow.

    The Redis must be the one the operator uses (--redis / DAGKUBE_REDIS_URL, e.g. through
    `kubectl port-forward`); the cluster comes from the kubeconfig. Functions defined in FILE
    travel with the DAG; modules it imports must be installed in the worker image.
    """
    with _errors():
        loaded = load_workflow_file(file)
        handle = loaded.workflow.submit(
            namespace,
            image,
            planner,
            sla,
            classes,
            optimizations=optimizations,
            max_workers=max_workers,
            timeout_s=timeout,
            retries=retries,
            ttl_after_finished_s=ttl,
            redis_url=redis_url,
            kube_api_url=kube_api_url,
        )
        err.print(f"workflow.dagkube.io/[bold]{handle.name}[/] created in namespace {namespace}")
        if not wait:
            out.print(handle.name)
            err.print(f"follow it with: dagkube status {handle.name} -n {namespace} --watch")
            return
        outputs = _follow(handle, wait_timeout)
        status = handle.status()
        _print_status(handle.name, namespace, status)
        out.print(f"[bold]Result:[/] {describe_value(outputs)}")
        if loaded.verify is not None:
            try:
                loaded.verify(outputs)
            except Exception as exc:
                err.print(f"[red]verify rejected the result:[/] {type(exc).__name__}: {exc}")
                sys.exit(EXIT_FAILED)


def _follow(handle: Any, timeout_s: float | None) -> Any:
    """``handle.wait()`` with a progress bar on a terminal."""
    with _progress(err.is_terminal, 0, handle.name) as on_progress:

        def on_status(status: dict[str, Any]) -> None:
            tasks = status.get("tasks") or {}
            if on_progress and tasks.get("total"):
                on_progress(tasks.get("done", 0), tasks["total"])

        return handle.wait(timeout_s, on_status=on_status)


@main.command()
@click.argument("name")
@NAMESPACE_OPTION
@KUBE_API_OPTION
@click.option("--watch", is_flag=True, help="Follow the Workflow until it ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON on stdout.")
def status(name: str, namespace: str, kube_api_url: str | None, watch: bool, as_json: bool) -> None:
    """Show the status of the Workflow NAME (phase, tasks, makespan, resources, failure).

    Exit code 1 when the Workflow failed, 0 otherwise (also while it runs).
    """
    from dagkube.kubernetes.submit import SubmitError, SubmittedWorkflow
    from dagkube.kubernetes.workflow_cr import Phase

    with _errors():
        handle = SubmittedWorkflow(name, namespace, kube_api_url=kube_api_url)
        if watch:
            # A Workflow that failed ends the watch with its error: the status below shows it.
            with contextlib.suppress(TaskFailed, SubmitError):
                _follow(handle, None)
        current = handle.status()
        if as_json:
            out.print_json(json.dumps(current))
        else:
            _print_status(name, namespace, current)
        if current.get("phase") == Phase.FAILED:
            sys.exit(EXIT_FAILED)


def _print_status(name: str, namespace: str, status: dict[str, Any]) -> None:
    from dagkube.kubernetes.workflow_cr import Phase

    phase = status.get("phase") or Phase.PENDING
    style = {Phase.SUCCEEDED: "green", Phase.FAILED: "red"}.get(phase, "yellow")
    tasks = status.get("tasks") or {}
    workers = status.get("workers") or {}
    resources = status.get("resources") or {}
    table = Table(title=f"Workflow {namespace}/{name}: [{style}]{phase}[/]", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [
        ("run", status.get("runId")),
        ("planner / SLA", f"{status.get('planner', '-')} / {status.get('sla', '-')}"),
        (
            "tasks",
            f"{tasks.get('done', 0)}/{tasks.get('total', '?')} done, {tasks.get('failed', 0)} "
            "failed",
        ),
        ("makespan predicted", _fmt(status.get("predictedMakespanSeconds"), "{:.2f}s")),
        ("makespan measured", _fmt(status.get("actualMakespanSeconds"), "{:.2f}s")),
        ("SLA met", "-" if status.get("slaMet") is None else "yes" if status["slaMet"] else "no"),
        (
            "workers cold/warm/pre-warmed",
            f"{workers.get('cold', 0)}/{workers.get('warm', 0)}/{workers.get('prewarmed', 0)}",
        ),
        ("GB-s", _fmt(resources.get("gbSeconds"), "{:.3f}")),
        (
            "started / completed",
            f"{status.get('startTime', '-')} / {status.get('completionTime', '-')}",
        ),
        ("failed task", status.get("failedTask")),
        ("message", status.get("message")),
    ]
    for field, value in rows:
        if value not in (None, ""):
            table.add_row(field, str(value))
    out.print(table)


if __name__ == "__main__":
    main(prog_name="dagkube")
