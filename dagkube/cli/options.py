"""Options and arguments more than one command takes, and the callbacks that check them: a
value is parsed where click reads it, so a bad one is a usage error naming its option."""

from __future__ import annotations

from typing import Any

import click

from dagkube.errors import InvalidOption
from dagkube.planning import (
    DEFAULT_PLANNER,
    OBJECTIVES,
    OPTIMIZATIONS,
    PLANNER_NAMES,
    check_max_gb_s,
    check_objective,
    check_optimizations,
    check_planner,
)
from dagkube.planning.sla import ACCEPTED_SLAS, parse_sla
from dagkube.resources import ACCEPTED_FORMS, parse_classes

FILE_CONVENTION = """\
FILE is a Python file that defines the workflow in one of two ways:

\b
  workflow = dagkube.Workflow(...)      a module-level Workflow, or
  def build(): return dagkube.Workflow(...)   (or the output task nodes)

It may also define verify(result), called with the outputs after a successful run: raise
(e.g. assert) to reject them. Its directory is importable, so helper modules next to it work.
"""


def validated(parse: Any) -> Any:
    """A click callback that parses a value, turning InvalidOption into a usage error."""

    def callback(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        if value is None:
            return None
        try:
            return parse(value)
        except InvalidOption as exc:
            raise click.BadParameter(str(exc)) from None

    return callback


CLASSES_OPTION = click.option(
    "--classes",
    default=None,
    callback=validated(parse_classes),
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
    default=DEFAULT_PLANNER,
    show_default=True,
    callback=validated(check_planner),
    help=f"Planner: {', '.join(PLANNER_NAMES)} (-opt: with its optimizations, each kept only "
    "where the timing model predicts it helps). auto predicts every planner with and without "
    "each optimization and keeps the best for --objective.",
)
OBJECTIVE_OPTION = click.option(
    "--objective",
    default="makespan",
    show_default=True,
    callback=validated(check_objective),
    help=f"What choosing between candidate plans optimizes: {', '.join(OBJECTIVES)}. makespan: "
    "the shortest predicted run, then the fewest GB-s; cost: the fewest predicted GB-s, then "
    "the shortest; balanced: the smallest makespan x GB-s.",
)
MAX_GB_S_OPTION = click.option(
    "--max-gb-s",
    type=float,
    default=None,
    callback=validated(check_max_gb_s),
    metavar="GB_S",
    help="GB-s budget: the best plan for --objective among those predicted within it; if "
    "none is, the cheapest (the plan's notes say so).",
)
OPTIMIZATIONS_OPTION = click.option(
    "--optimizations",
    default="",
    callback=validated(check_optimizations),
    help="Optimizations to switch on, comma-separated (besides those of an -opt "
    f"planner; with auto, the only ones it tries): {', '.join(OPTIMIZATIONS)}.",
)
SLA_OPTION = click.option(
    "--sla",
    default="avg",
    show_default=True,
    callback=validated(parse_sla),
    help=f"SLA: {ACCEPTED_SLAS}.",
)
# The metrics endpoint has no authentication: it answers on this machine only unless asked.
METRICS_HOST = "127.0.0.1"


def metrics_host_option(flag: str) -> Any:
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


def local_run_options(function: Any) -> Any:
    """The options ``run`` and ``plan`` share: what to plan with, and where."""
    options = [
        FILE_ARGUMENT,
        PLANNER_OPTION,
        OPTIMIZATIONS_OPTION,
        OBJECTIVE_OPTION,
        MAX_GB_S_OPTION,
        SLA_OPTION,
        CLASSES_OPTION,
        REDIS_OPTION,
        MAX_WORKERS_OPTION,
        ENFORCE_OPTION,
        click.option(
            "--idle-timeout",
            type=float,
            callback=validated(_check_idle_timeout),
            default=30.0,
            show_default=True,
            help="Seconds an idle worker waits before it exits (the next start is cold); 0.1 to "
            "86400.",
        ),
    ]
    for option in reversed(options):
        function = option(function)
    return function
