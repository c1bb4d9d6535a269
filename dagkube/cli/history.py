"""The commands that read the run history: ``history`` (and ``history prune``), ``report``
and ``metrics serve``, with the helpers other commands share to reach that history — a
Redis session (the embedded server by default) and the Prometheus endpoint."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

import click

from dagkube.cli.console import err, handled_errors, out
from dagkube.cli.options import REDIS_OPTION, metrics_host_option, validated
from dagkube.cli.render import history_table, print_prune_report
from dagkube.errors import InvalidOption, RedisUnavailable


def with_redis(redis_url: str | None, action: Any) -> Any:
    """Run ``action(redis)`` against the configured Redis (the embedded one by default)."""
    from dagkube.runtime.embedded import EmbeddedRedis
    from dagkube.store.connection import connect

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


def serve_metrics(
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
    from dagkube.store.connection import redact, sync_client

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


@click.group(invoke_without_command=True)
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

    with handled_errors():
        runs = with_redis(redis_url, lambda r: list_runs(r, workflow=workflow_name, limit=limit))
        if as_json:
            out.print_json(json.dumps([r.model_dump() for r in runs]))
            return
        if not runs:
            which = f" of workflow {workflow_name!r}" if workflow_name else ""
            out.print(f"No runs{which} in the history yet.")
            return
        out.print(history_table(runs))


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
    callback=validated(_check_days),
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

    with handled_errors():
        if keep_runs is None and older_than_days is None:
            raise InvalidOption(
                "history prune: nothing to prune; give --keep-runs N (runs kept per workflow "
                "structure, N >= 0) and/or --older-than DAYS (days since a run finished, >= 0)"
            )
        before = None if older_than_days is None else time.time() - older_than_days * 86400
        report = with_redis(
            redis_url,
            lambda r: prune_history(
                r,
                keep_runs=keep_runs,
                finished_before=before,
                workflow=workflow_name,
                dry_run=dry_run,
            ),
        )
        print_prune_report(report, dry_run)


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


@click.command()
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

    with handled_errors():
        start = _parse_since(since)
        histories = with_redis(
            redis_url,
            lambda r: load_histories(r, workflow=workflow_name, since=start, limit=limit),
        )
        if run_id and not any(h.run.run_id == run_id for h in histories):
            raise InvalidOption(f"--run {run_id!r}: no such run in the selected history")
        Path(output).write_text(render(histories, run_id=run_id), encoding="utf-8")
        what = f"{len(histories)} runs" if histories else "no runs in the history yet"
        err.print(f"wrote {output} ({what})")


@click.group()
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
@metrics_host_option("--host")
@REDIS_OPTION
def metrics_serve(port: int, metrics_host: str, redis_url: str | None) -> None:
    """Serve /metrics for the run history of a Redis until interrupted (Ctrl-C).

    Each scrape folds in the runs it has not seen yet; the live state of worker pools
    (queue depth, workers by state) comes from `dagkube run --metrics-port` and the
    operator, which own pools.
    """
    from dagkube.runtime.embedded import EmbeddedRedis

    with handled_errors(), contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(EmbeddedRedis())
        server, thread = serve_metrics(
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
