"""The commands that run a workflow on Kubernetes through the operator: ``manifest`` (a
Workflow to apply), ``submit`` (store the DAG and create the Workflow) and ``status``."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import sys
from pathlib import Path
from typing import Any

import click

from dagkube.cli.console import EXIT_FAILED, err, handled_errors, out
from dagkube.cli.options import (
    CLASSES_OPTION,
    FILE_ARGUMENT,
    FILE_CONVENTION,
    MAX_GB_S_OPTION,
    OBJECTIVE_OPTION,
    OPTIMIZATIONS_OPTION,
    PLANNER_OPTION,
    REDIS_OPTION,
    SLA_OPTION,
)
from dagkube.cli.render import describe_value, manifest_yaml, print_status, progress_bar
from dagkube.errors import TaskFailed
from dagkube.kubernetes.workflow_cr import Source, WorkflowSpec, workflow_manifest
from dagkube.loader import load_workflow_file

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
    """What a Workflow's spec says besides its source (``submit`` and ``manifest``), handed to
    the command as one typed ``spec`` whose source the command fills in."""

    @functools.wraps(function)
    def with_spec(
        *,
        planner: str,
        optimizations: list[str],
        objective: str,
        max_gb_s: float | None,
        sla: str,
        classes: list[int] | None,
        image: str | None,
        max_workers: int | None,
        timeout: int | None,
        retries: int | None,
        ttl: int | None,
        **rest: Any,
    ) -> Any:
        with handled_errors():
            spec = WorkflowSpec.from_options(
                Source(),
                planner=planner,
                sla=sla,
                optimizations=optimizations,
                objective=objective,
                max_gb_s=max_gb_s,
                classes_mib=classes,
                max_workers=max_workers,
                image=image,
                timeout_s=timeout,
                retries=retries,
                ttl_after_finished_s=ttl,
            )
        return function(spec=spec, **rest)

    options = [
        FILE_ARGUMENT,
        NAMESPACE_OPTION,
        PLANNER_OPTION,
        OPTIMIZATIONS_OPTION,
        OBJECTIVE_OPTION,
        MAX_GB_S_OPTION,
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
        with_spec = option(with_spec)
    return with_spec


@click.command(epilog=FILE_CONVENTION)
@_workflow_options
@click.option(
    "--name",
    default=None,
    help="metadata.name [default: the workflow's name and a random suffix, e.g. "
    "tree-reduction-x7k2p: each apply starts a new run].",
)
def manifest(file: str, namespace: str, spec: WorkflowSpec, name: str | None) -> None:
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

    from dagkube.kubernetes.submit import name_stem

    source = click.get_current_context().get_parameter_source("namespace")
    if source is click.core.ParameterSource.DEFAULT:
        namespace = ""

    with handled_errors():
        loaded = load_workflow_file(file)
        # A name, not generateName: `kubectl apply` refuses generateName.
        suffix = "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        body = workflow_manifest(
            dataclasses.replace(spec, source=Source(inline=Path(file).read_text(encoding="utf-8"))),
            name=name or name_stem(loaded.workflow.name) + suffix,
            namespace=namespace,
        )
        out.print(manifest_yaml(body), end="", markup=False, highlight=False, soft_wrap=True)


@click.command(epilog=FILE_CONVENTION)
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
    spec: WorkflowSpec,
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
    from dagkube.kubernetes import submit as kubernetes

    with handled_errors():
        loaded = load_workflow_file(file)
        handle = kubernetes.submit(
            loaded.workflow.dag,
            spec,
            namespace=namespace,
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
        print_status(handle.name, namespace, status)
        out.print(f"[bold]Result:[/] {describe_value(outputs)}")
        if loaded.verify is not None:
            try:
                loaded.verify(outputs)
            except Exception as exc:
                err.print(f"[red]verify rejected the result:[/] {type(exc).__name__}: {exc}")
                sys.exit(EXIT_FAILED)


def _follow(handle: Any, timeout_s: float | None) -> Any:
    """``handle.wait()`` with a progress bar on a terminal."""
    with progress_bar(err.is_terminal, 0, handle.name) as on_progress:

        def on_status(status: dict[str, Any]) -> None:
            tasks = status.get("tasks") or {}
            if on_progress and tasks.get("total"):
                on_progress(tasks.get("done", 0), tasks["total"])

        return handle.wait(timeout_s, on_status=on_status)


@click.command()
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

    with handled_errors():
        handle = SubmittedWorkflow(name, namespace, kube_api_url=kube_api_url)
        if watch:
            # A Workflow that failed ends the watch with its error: the status below shows it.
            with contextlib.suppress(TaskFailed, SubmitError):
                _follow(handle, None)
        current = handle.status()
        if as_json:
            out.print_json(json.dumps(current))
        else:
            print_status(name, namespace, current)
        if current.get("phase") == Phase.FAILED:
            sys.exit(EXIT_FAILED)
