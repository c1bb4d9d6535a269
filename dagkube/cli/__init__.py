"""The ``dagkube`` command line.

Exit codes: 0 success; 1 the run failed (a task raised, or the workflow's own ``verify``
rejected the result); 2 bad input (file, option, workflow); 3 Redis unreachable, refused us,
gone past the reconnection grace, or restarted mid-run (the run is then failed); 130
interrupted (Ctrl-C): the run is cancelled and every worker and server it started stops.

The group is defined here and the commands in the modules beside it: ``local`` (run, plan,
experiment), ``history`` (history, report, metrics), ``kube`` (manifest, submit, status);
``options``, ``console`` and ``render`` hold what they share.
"""

from __future__ import annotations

import signal

import click

from dagkube.cli import history, kube, local
from dagkube.cli.console import on_sigterm


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="dagkube")
def main() -> None:
    """dagkube: run planned Python DAG workflows on serverless-style workers.

    Locally, a private Redis is started under $DAGKUBE_HOME (default ~/.dagkube) unless
    DAGKUBE_REDIS_URL or --redis points at one; it keeps the run history that planners
    learn from.
    """
    signal.signal(signal.SIGTERM, on_sigterm)  # clean up as on Ctrl-C, then exit 143


main.add_command(local.run)
main.add_command(local.plan)
main.add_command(local.experiment)
main.add_command(history.history)
main.add_command(history.report)
main.add_command(history.metrics)
main.add_command(kube.manifest)
main.add_command(kube.submit)
main.add_command(kube.status)
