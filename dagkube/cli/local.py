"""The commands that plan and run a workflow on this machine: ``run``, ``plan`` and
``experiment``. Each loads the workflow file first, so a bad file fails before anything
starts; the runtime is imported only when a command needs it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from dagkube.cli.console import EXIT_FAILED, err, handled_errors, out
from dagkube.cli.history import serve_metrics, with_redis
from dagkube.cli.options import (
    CLASSES_OPTION,
    ENFORCE_OPTION,
    FILE_CONVENTION,
    MAX_WORKERS_OPTION,
    REDIS_OPTION,
    local_run_options,
    metrics_host_option,
    validated,
)
from dagkube.cli.render import (
    draw_plan,
    experiment_table,
    print_plan,
    print_run_json,
    print_run_summary,
    progress_bar,
    run_summary,
)
from dagkube.loader import load_workflow_file
from dagkube.planning import PLANNER_NAMES
from dagkube.planning.sla import ACCEPTED_SLAS
from dagkube.store.records import RunStatus


def _check_timeout(value: float) -> float:
    """``run --timeout``: accepted as ``Workflow.run(timeout=...)`` accepts it."""
    from dagkube.runtime.launcher import check_timeout  # the runtime loads only when used

    return check_timeout(value)


@click.command(epilog=FILE_CONVENTION)
@local_run_options
@click.option(
    "--timeout",
    type=float,
    default=None,
    callback=validated(_check_timeout),
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
@metrics_host_option("--metrics-host")
def run(
    file: str,
    planner: str,
    optimizations: list[str],
    objective: str,
    max_gb_s: float | None,
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

    with handled_errors():
        loaded = load_workflow_file(file)
        wf = loaded.workflow
        with (
            LocalRuntime(
                redis_url, max_workers=max_workers, idle_timeout_s=idle_timeout, enforce=enforce
            ) as rt,
            progress_bar(
                not as_json and err.is_terminal, len(wf.dag.tasks), wf.name
            ) as on_progress,
        ):
            if rt.enforcement_note and enforce is None and not as_json:
                err.print(f"[yellow]note:[/] {rt.enforcement_note}")
            if metrics_port is not None:
                _serve_run_metrics(rt, metrics_host, metrics_port)
            chosen = rt.plan(
                wf.dag,
                planner,
                sla,
                classes,
                optimizations=optimizations,
                objective=objective,
                max_gb_s=max_gb_s,
            )
            result = rt.run(wf.dag, chosen, timeout_s=timeout, on_progress=on_progress)
            record = result.record
            if any(w.prewarmed for w in chosen.workers):
                # a pre-warmed worker left unused is charged when it exits: stop the workers
                # now so the summary shows what pre-warming wasted
                rt.cool_down()
                record = rt.run_record(result.run_id) or record
        verified, verify_error = _verify(loaded.verify, result)
        summary = run_summary(result, wf.name, chosen, verified, record)
        failure = task_failed_from(result.record) if result.status != RunStatus.SUCCEEDED else None
        if as_json:
            print_run_json(summary, result.outputs, failure, verify_error)
        else:
            print_run_summary(summary, result.outputs, failure, verify_error)
        if failure is not None or verified is False:
            sys.exit(EXIT_FAILED)


def _serve_run_metrics(rt: Any, host: str, port: int) -> None:
    """``run --metrics-port``: the run history and the live pool of the started runtime."""
    backend = rt.backend
    assert backend is not None and rt.url is not None  # the runtime is started
    serve_metrics(
        rt.url,
        host=host,
        port=port,
        host_option="--metrics-host",
        port_option="--metrics-port",
        pools=[rt.pool],
        workers_alive=backend.alive,
    )


def _verify(verify: Any, result: Any) -> tuple[bool | None, str]:
    """The verdict of the file's ``verify`` on a successful run's outputs and, when it
    rejected them, why; (None, "") when there is nothing to verify."""
    if result.status != RunStatus.SUCCEEDED or verify is None:
        return None, ""
    try:
        verify(result.outputs)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@click.command(epilog=FILE_CONVENTION)
@local_run_options
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
    objective: str,
    max_gb_s: float | None,
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
    worker (class, CPU, tasks, predicted busy period, cold or warm), the run totals, and the
    candidate plans the planner predicted before it chose (see --objective)."""
    from dagkube import planning
    from dagkube.metrics.history import load_snapshot
    from dagkube.runtime import cgroups
    from dagkube.runtime.local_backend import default_max_workers

    with handled_errors():
        wf = load_workflow_file(file).workflow
        history = with_redis(redis_url, lambda r: load_snapshot(r, wf.structure_hash))
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
            objective=objective,
            max_gb_s=max_gb_s,
        )
        result = planning.plan(wf.dag, planner, options)
        if output:
            draw_plan(wf.dag, result, Path(output))
        if as_json:
            out.print_json(result.model_dump_json())
            return
        print_plan(result, wf.name, planner)


@click.command(epilog=FILE_CONVENTION)
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--planners",
    default="wukong,uniform,non-uniform,auto",
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

    with handled_errors():
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
            progress_bar(not as_json and err.is_terminal, total, "experiment") as progress,
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
            out.print(experiment_table(result, f"Experiment: {total} runs of {Path(file).name}"))
        if rejected:
            first = rejected[0]
            err.print(
                f"[red]verify() rejected the outputs of {len(rejected)} of "
                f"{len(result.samples)} runs[/red] (first: run {first.run_id}, {first.planner} "
                f"{first.sla}: {first.verify_error})"
            )
            sys.exit(EXIT_FAILED)


def _split(values: str) -> list[str]:
    return [v.strip() for v in values.split(",") if v.strip()]
