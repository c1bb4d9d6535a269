"""What the commands print: outputs described briefly, the run summary, plan, experiment,
history and status tables, the progress bar, the plan's picture and the manifest's YAML.
Nothing here decides an exit code; the commands do."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from dagkube.cli.console import err, out
from dagkube.errors import InvalidOption
from dagkube.resources import cpu_for_memory, format_memory
from dagkube.store.records import RunStatus


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
def progress_bar(enabled: bool, total: int, name: str) -> Iterator[Any]:
    """A transient bar of tasks done on stderr, as an ``on_progress(done, total)`` callback;
    None when disabled (not a terminal, or JSON wanted)."""
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


def run_summary(
    result: Any, workflow: str, plan: Any, verified: bool | None, record: Any = None
) -> dict[str, Any]:
    """The summary of a local run, as ``run --json`` prints it (and the table shows it);
    ``record``: the run's record read again after late charges (default: the result's)."""
    record = record or result.record
    return {
        "run_id": result.run_id,
        "workflow": workflow,
        "status": result.status,
        "planner": record.planner,
        "chosen": next((a.label for a in plan.alternatives if a.chosen), None),
        "sla": record.sla,
        "classes": [format_memory(c) for c in plan.classes_used()],
        "tasks": record.tasks_total,
        "tasks_done": record.tasks_done,
        "makespan_s": record.makespan_s,
        "workers_cold": record.workers_cold,
        "workers_warm": record.workers_warm,
        "workers_lost": record.workers_lost,
        "workers_prewarmed": record.workers_prewarmed,
        "prewarm_wasted": record.prewarm_wasted,
        "prewarm_wasted_gb_s": record.prewarm_wasted_gb_s,
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


def print_run_json(summary: dict, outputs: Any, failure: Any, verify_error: str) -> None:
    """The summary as JSON on stdout, with the outputs described or the failure in full."""
    summary["outputs"] = describe_value(outputs) if failure is None else None
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


def print_run_summary(summary: dict, outputs: Any, failure: Any, verify_error: str) -> None:
    """The result (or the failure and its remote traceback), the verdict of ``verify`` and
    the run's table."""
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
    out.print(_run_table(summary))


def _run_table(summary: dict) -> Table:
    table = Table(title=f"Run {summary['run_id']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    makespan = summary["makespan_s"]
    table.add_row("status", summary["status"])
    planner, chosen = summary["planner"], summary["chosen"]
    if chosen and chosen != planner:
        planner = f"{planner}: {chosen}"
    table.add_row("planner / SLA", f"{planner} / {summary['sla']}")
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
    wasted = summary["prewarm_wasted"]
    table.add_row(
        "GB-seconds",
        f"{summary['gb_s']:.3f}"
        + (
            f" (+{summary['prewarm_wasted_gb_s']:.3f} by {wasted} pre-warmed worker(s) unused)"
            if wasted
            else ""
        ),
    )
    table.add_row(
        "CPU-seconds",
        f"{summary['cpu_s_used']:.3f} used of {summary['cpu_s_allocated']:.3f} allocated",
    )
    return table


def print_plan(result: Any, workflow: str, planner: str) -> None:
    """A plan as ``dagkube plan`` shows it: a row per worker, the optimizations per task, the
    predicted totals, the candidates the planner chose from, the critical path and the
    planner's notes."""
    table = Table(title=f"Plan of {workflow!r}: {planner}, SLA {result.sla}")
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
            out.print(
                f"[bold]{entry.name}[/] {task_id}: {_describe_params(entry.params.model_dump())}"
            )
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
    if len(result.alternatives) > 1:
        out.print(candidates_table(result))
    for note in result.notes:
        out.print(f"[dim]note:[/] {note}")


def candidates_table(result: Any) -> Table:
    """The candidate plans a planner predicted before choosing, the chosen one marked."""
    budget = f", GB-s budget {result.max_gb_s:g}" if result.max_gb_s is not None else ""
    table = Table(title=f"Candidates (objective {result.objective}{budget})")
    table.add_column("candidate")
    table.add_column("model makespan", justify="right")
    table.add_column("GB-s", justify="right")
    table.add_column("chosen / why not")
    for alternative in result.alternatives:
        table.add_row(
            alternative.label,
            f"{alternative.model_makespan_s:.3f}s",
            f"{alternative.predicted_gb_s:.3f}",
            "[bold green]chosen[/]" if alternative.chosen else (alternative.rejected or ""),
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


def draw_plan(dag: Any, result: Any, path: Path) -> None:
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


def experiment_table(result: Any, title: str) -> Table:
    """A row per (planner, SLA) of an experiment: medians, starts, prediction and SLA."""
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


def history_table(runs: list[Any]) -> Table:
    """The runs of ``dagkube history``, most recent first, with peak memory and OOM kills."""
    from dagkube.report import mib_text

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
        style = {RunStatus.SUCCEEDED: "green", RunStatus.FAILED: "red"}.get(r.status, "yellow")
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
    return table


def print_prune_report(report: Any, dry_run: bool) -> None:
    """What ``history prune`` removed (or would remove) and what it left."""
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


def manifest_yaml(body: dict[str, Any]) -> str:
    """YAML with multi-line strings (inline sources) as literal blocks."""
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def text(dumper: yaml.SafeDumper, value: str) -> Any:
        style = "|" if "\n" in value else None
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)

    Dumper.add_representer(str, text)
    return yaml.dump(body, Dumper=Dumper, sort_keys=False, allow_unicode=True)


def print_status(name: str, namespace: str, status: dict[str, Any]) -> None:
    """A Workflow's status as a table: phase, tasks, makespans, workers, resources, failure."""
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


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else pattern.format(value)
