"""``dagkube.Workflow``: a DAG built from output nodes, planned and run (locally for now)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from dagkube.dag import DEFAULT_INLINE_BUDGET_BYTES, DagSpec, build_dag
from dagkube.errors import TaskFailed
from dagkube.resources import parse_classes
from dagkube.store.records import RunStatus

if TYPE_CHECKING:
    from dagkube.planning import Plan

# dagkube.planning (its pydantic models) is imported where a plan is made, not with the
# package: building a DAG - what the operator's build process and `import dagkube` in a task
# module do - then starts in about a third of the time.


class Workflow:
    """A workflow: every task reachable from ``outputs`` (a node, a list or a dict of nodes).

    Building validates the graph (argument shapes, serializability, call signatures), gives
    every task a stable id (``function#n``) and computes the structure hash that groups runs
    of the same workflow for predictions.
    """

    def __init__(
        self,
        outputs: Any,
        name: str | None = None,
        *,
        inline_budget_bytes: int = DEFAULT_INLINE_BUDGET_BYTES,
    ) -> None:
        self.name = name or _default_name(outputs)
        self.dag: DagSpec = build_dag(outputs, self.name, inline_budget_bytes)
        self.last_run: Any = None
        self.last_plan: Plan | None = None

    def __repr__(self) -> str:
        return f"<Workflow {self.name!r}: {len(self.dag.tasks)} tasks, {self.dag.structure_hash}>"

    @property
    def structure_hash(self) -> str:
        return self.dag.structure_hash

    @property
    def task_ids(self) -> list[str]:
        return list(self.dag.tasks)

    def plan(
        self,
        planner: str = "auto",
        sla: str = "avg",
        classes: Any = None,
        *,
        runtime: Any = None,
        optimizations: Any = None,
        objective: str = "makespan",
        max_gb_s: float | None = None,
    ) -> Plan:
        """The Plan the named planner makes for this workflow, without running it.

        With a ``runtime``, the planner learns from that runtime's run history and sees its
        warm workers; without one, it plans from documented defaults (no history).
        ``objective`` (``makespan``, ``cost`` or ``balanced``) and ``max_gb_s`` (a GB-s
        budget) decide between the candidate plans the planner predicts (``plan.alternatives``).
        """
        from dagkube.planning import PlanningOptions, plan

        if runtime is not None:
            return runtime.plan(
                self.dag,
                planner,
                sla,
                classes,
                optimizations=optimizations,
                objective=objective,
                max_gb_s=max_gb_s,
            )
        options = PlanningOptions.for_run(
            classes,
            sla=sla,
            optimizations=optimizations,
            objective=objective,
            max_gb_s=max_gb_s,
        )
        return plan(self.dag, planner, options)

    def run(
        self,
        planner: str = "auto",
        sla: str = "avg",
        classes: Any = None,
        *,
        runtime: Any = None,
        timeout: float | None = None,
        on_progress: Callable[[int, int], None] | None = None,
        optimizations: Any = None,
        objective: str = "makespan",
        max_gb_s: float | None = None,
    ) -> Any:
        """Plan (from the runtime's history) and run; returns the outputs in the shape given,
        or raises :class:`TaskFailed`. ``optimizations``: names to switch on besides those a
        ``-opt`` planner implies (e.g. ``["prewarm"]``); ``objective`` and ``max_gb_s`` as for
        :meth:`plan`. The plan used is kept in ``last_plan``.

        ``runtime``: a started :class:`dagkube.LocalRuntime` to reuse (warm workers, one Redis);
        without one, a LocalRuntime is opened for this run and closed after it.

        ``timeout``: seconds (a positive number) the run may take. Past it the run is cancelled
        and ended, recorded as cancelled in the history, and :class:`RunTimeout` is raised.
        """
        from dagkube.runtime.launcher import check_timeout
        from dagkube.runtime.local import LocalRuntime

        timeout_s = None if timeout is None else check_timeout(timeout)
        owned = runtime is None
        rt = LocalRuntime() if owned else runtime
        try:
            chosen = self.plan(
                planner,
                sla,
                classes,
                runtime=rt,
                optimizations=optimizations,
                objective=objective,
                max_gb_s=max_gb_s,
            )
            self.last_plan = chosen
            result = rt.run(self.dag, chosen, timeout_s=timeout_s, on_progress=on_progress)
        finally:
            if owned:
                rt.close()
        self.last_run = result
        if result.status != RunStatus.SUCCEEDED:
            from dagkube.runtime.launcher import task_failed_from

            error = task_failed_from(result.record)
            assert isinstance(error, TaskFailed)
            raise error
        return result.outputs

    def submit(
        self,
        namespace: str = "default",
        image: str | None = None,
        planner: str = "auto",
        sla: str = "avg",
        classes: Any = None,
        *,
        optimizations: Any = None,
        objective: str = "makespan",
        max_gb_s: float | None = None,
        max_workers: int | None = None,
        timeout_s: int | None = None,
        retries: int | None = None,
        ttl_after_finished_s: int | None = None,
        redis_url: str | None = None,
        kube_api_url: str | None = None,
    ) -> Any:
        """Run on Kubernetes: store the DAG in the operator's Redis (``redis_url``, default
        ``$DAGKUBE_REDIS_URL``) and create a Workflow with ``source.ref`` in ``namespace``
        (kubeconfig or in-cluster credentials, or ``kube_api_url``). Returns a
        :class:`~dagkube.kubernetes.submit.SubmittedWorkflow`: ``.wait()`` returns the outputs
        or raises :class:`TaskFailed`; ``.status()`` is the object's ``.status``.

        Functions are found by the workers as they were pickled: functions of ``__main__`` or of
        a file run with the CLI travel by value; functions of an importable module need that
        module in the worker ``image``.
        """
        from dagkube.kubernetes.submit import submit
        from dagkube.kubernetes.workflow_cr import Source, WorkflowSpec

        spec = WorkflowSpec.from_options(
            Source(),  # replaced by the stored DAG
            planner=planner,
            sla=sla,
            optimizations=optimizations,
            objective=objective,
            max_gb_s=max_gb_s,
            classes_mib=parse_classes(classes) if classes is not None else None,
            max_workers=max_workers,
            image=image,
            timeout_s=timeout_s,
            retries=retries,
            ttl_after_finished_s=ttl_after_finished_s,
        )
        return submit(
            self.dag, spec, namespace=namespace, redis_url=redis_url, kube_api_url=kube_api_url
        )


def _default_name(outputs: Any) -> str:
    from dagkube.sdk import TaskNode

    first = outputs
    if isinstance(outputs, dict) and outputs:
        first = next(iter(outputs.values()))
    elif isinstance(outputs, (list, tuple)) and outputs:
        first = outputs[0]
    if isinstance(first, TaskNode):
        return first.function.options.name
    return "workflow"
