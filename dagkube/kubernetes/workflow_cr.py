"""The Workflow custom resource written once: its names, its phases and its typed ``spec``.

The submitting side (``Workflow.submit``, ``dagkube submit`` and ``dagkube manifest``) builds a
:class:`WorkflowSpec` and turns it into an object with :func:`workflow_manifest`; the operator
parses a Workflow's ``spec`` into the same class (``dagkube_operator.spec.parse_spec``, which
adds the checks a schema cannot make). The CRD in the Helm chart spells the same names and
defaults.

Imports nothing heavier than :mod:`dagkube.resources`, so the operator's status builders and
the command line can use it without loading the Kubernetes client or the planners.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Final

from dagkube.resources import (
    DEFAULT_CLASSES_MIB,
    DEFAULT_MAX_CPU,
    DEFAULT_MEMORY_PER_CPU_MIB,
    format_memory,
)

GROUP: Final = "dagkube.io"
VERSION: Final = "v1alpha1"
PLURAL: Final = "workflows"
KIND: Final = "Workflow"
API_VERSION: Final = f"{GROUP}/{VERSION}"


class Phase(enum.StrEnum):
    """``status.phase`` of a Workflow, in the order a run goes through them."""

    PENDING = "Pending"  # no status yet: the operator has not planned it
    PLANNING = "Planning"  # building the DAG and planning it
    RUNNING = "Running"  # launched: its workers run its tasks
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"


# A Workflow in one of these phases does not change phase again.
ENDED_PHASES: Final = (Phase.SUCCEEDED, Phase.FAILED)


@dataclass(frozen=True)
class Source:
    """Where a Workflow's DAG comes from; exactly one of ``module`` ("pkg.mod:function" with
    JSON ``args``), ``inline`` Python source, or ``dag`` (the id of a DAG the SDK stored, at
    ``redis_key`` when given)."""

    module: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    inline: str | None = None
    dag: str | None = None
    redis_key: str | None = None

    @property
    def kind(self) -> str:
        return "module" if self.module else "inline" if self.inline is not None else "ref"

    def to_manifest(self) -> dict[str, Any]:
        """``spec.source`` as the CRD spells it."""
        if self.module:
            return {"module": {"name": self.module, "args": dict(self.args)}}
        if self.inline is not None:
            return {"inline": self.inline}
        ref: dict[str, Any] = {"dag": self.dag}
        if self.redis_key is not None:
            ref["redisKey"] = self.redis_key
        return {"ref": ref}


@dataclass(frozen=True)
class WorkflowSpec:
    """A Workflow's ``spec``, typed. ``planner`` is a base planner or ``auto`` (an ``-opt``
    variant is split into its base and ``optimizations`` by :meth:`from_options`);
    ``objective`` and ``max_gb_s`` (a GB-s budget) decide between candidate plans; the
    defaults are the CRD's."""

    source: Source
    planner: str = "auto"
    sla: str = "avg"
    optimizations: list[str] = field(default_factory=list)
    objective: str = "makespan"
    max_gb_s: float | None = None
    classes_mib: list[int] = field(default_factory=lambda: list(DEFAULT_CLASSES_MIB))
    memory_per_cpu_mib: int = DEFAULT_MEMORY_PER_CPU_MIB
    max_cpu: float = DEFAULT_MAX_CPU
    max_workers: int | None = None
    image: str | None = None
    timeout_s: int | None = None
    retries: int | None = None
    ttl_after_finished_s: int | None = None

    @classmethod
    def from_options(
        cls,
        source: Source,
        *,
        planner: str = "auto",
        sla: str = "avg",
        optimizations: Any = None,
        objective: str = "makespan",
        max_gb_s: float | None = None,
        classes_mib: list[int] | None = None,
        max_workers: int | None = None,
        image: str | None = None,
        timeout_s: int | None = None,
        retries: int | None = None,
        ttl_after_finished_s: int | None = None,
    ) -> WorkflowSpec:
        """The spec for what a user asked for (SDK or command line): names checked and
        normalized (:class:`~dagkube.errors.InvalidOption` otherwise), an ``-opt`` planner
        split into its base and optimizations, no classes meaning the default ones."""
        from dagkube.planning import (
            check_max_gb_s,
            check_objective,
            check_optimizations,
            check_planner,
            split_planner,
        )
        from dagkube.planning.sla import parse_sla

        base, implied = split_planner(check_planner(planner))
        chosen = check_optimizations([*check_optimizations(optimizations), *implied])
        return cls(
            source=source,
            planner=base,
            sla=parse_sla(sla),
            optimizations=chosen,
            objective=check_objective(objective),
            max_gb_s=check_max_gb_s(max_gb_s),
            classes_mib=sorted(classes_mib) if classes_mib else list(DEFAULT_CLASSES_MIB),
            max_workers=max_workers,
            image=image,
            timeout_s=timeout_s,
            retries=retries,
            ttl_after_finished_s=ttl_after_finished_s,
        )

    def to_manifest(self) -> dict[str, Any]:
        """``spec`` as the CRD spells it. Fields at the CRD's default are left out, so the
        object shows what was chosen; the planner's name and SLA are always written."""
        planner: dict[str, Any] = {"name": self.planner, "sla": self.sla}
        if self.optimizations:
            planner["optimizations"] = list(self.optimizations)
        if self.objective != "makespan":
            planner["objective"] = self.objective
        if self.max_gb_s is not None:
            planner["maxGbS"] = self.max_gb_s
        resources: dict[str, Any] = {}
        if list(self.classes_mib) != list(DEFAULT_CLASSES_MIB):
            resources["classes"] = [format_memory(c) for c in sorted(self.classes_mib)]
        if self.memory_per_cpu_mib != DEFAULT_MEMORY_PER_CPU_MIB:
            resources["memoryPerCpu"] = format_memory(self.memory_per_cpu_mib)
        if self.max_cpu != DEFAULT_MAX_CPU:
            resources["maxCpu"] = self.max_cpu
        if self.max_workers is not None:
            resources["maxWorkers"] = self.max_workers
        spec: dict[str, Any] = {"source": self.source.to_manifest(), "planner": planner}
        if resources:
            spec["resources"] = resources
        optional = {
            "image": self.image,
            "timeoutSeconds": self.timeout_s,
            "retries": self.retries,
            "ttlSecondsAfterFinished": self.ttl_after_finished_s,
        }
        spec.update({k: v for k, v in optional.items() if v is not None})
        return spec


def workflow_manifest(
    spec: WorkflowSpec,
    *,
    name: str | None = None,
    generate_name: str | None = None,
    namespace: str | None = None,
) -> dict[str, Any]:
    """A Workflow object (plain dict) for ``spec``: named ``name``, else ``generateName``
    (``generate_name``, default ``workflow-``); no namespace: the one ``kubectl`` uses."""
    metadata: dict[str, Any] = {}
    if name:
        metadata["name"] = name
    else:
        metadata["generateName"] = generate_name or "workflow-"
    if namespace:
        metadata["namespace"] = namespace
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": metadata,
        "spec": spec.to_manifest(),
    }
