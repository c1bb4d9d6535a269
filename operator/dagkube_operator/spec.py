"""A Workflow's ``spec`` as the operator uses it: parsed, defaulted and checked, without I/O,
into the typed :class:`~dagkube.kubernetes.workflow_cr.WorkflowSpec` the submitting side writes.

The CRD schema rejects malformed specs at the API server; this is the second line, for what a
schema cannot know (classes, worker counts and images the operator allows, planner names a
newer CRD may list) and for objects that reached the operator without schema validation (an
older CRD, an emulator). Every problem becomes a :class:`SpecError` whose message names the
field, the value and what is accepted: the operator turns it into a ``Failed`` phase, a
condition and an Event.
"""

from __future__ import annotations

import fnmatch
import re
from typing import Any

from dagkube.errors import DagkubeError
from dagkube.kubernetes.workflow_cr import Source, WorkflowSpec
from dagkube.planning import (
    DEFAULT_PLANNER,
    PLANNERS,
    check_max_gb_s,
    check_objective,
    check_optimizations,
)
from dagkube.planning.sla import parse_sla
from dagkube.resources import DEFAULT_MAX_CPU, parse_memory
from dagkube.store.keys import stored_dag
from dagkube_operator.reasons import Reason, WorkflowFailed

DEFAULT_CLASSES = ("512Mi", "1Gi", "2Gi")
MIN_CLASS_MIB = 128
MAX_CLASS_MIB = 16 * 1024  # default upper bound when the operator is given no allowed list
# The CRD's hard limits (crds/workflow.yaml), checked again for objects that skipped its schema.
MAX_INLINE_SOURCE_CHARS = 256 * 1024
MAX_CLASSES = 16
MAX_WORKERS = 10_000
MAX_TIMEOUT_S = 7 * 24 * 3600
MAX_TTL_AFTER_FINISHED_S = 365 * 24 * 3600
_MODULE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$")
_DAG_ID = re.compile(r"^[0-9a-f]{16,64}$")


class SpecError(WorkflowFailed):
    """A Workflow spec the operator cannot run (a source that does not build, a plan the
    planner rejects); ``reason`` says which, as an Event reason."""


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{where} must be an object, got {type(value).__name__} {value!r}")
    return value


def _integer(value: Any, where: str, minimum: int, maximum: int | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError(f"{where}={value!r} must be an integer")
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
        raise SpecError(f"{where}={value} is out of range: it must be {bounds}")
    return value


def parse_source(value: Any) -> Source:
    source = _mapping(value, "spec.source")
    given = [key for key in ("module", "inline", "ref") if source.get(key) is not None]
    if len(given) != 1:
        raise SpecError(
            "spec.source must set exactly one of module, inline or ref; "
            f"got {', '.join(given) if given else 'none'}"
        )
    if given == ["module"]:
        module = _mapping(source["module"], "spec.source.module")
        name = module.get("name")
        if not isinstance(name, str) or not _MODULE.match(name):
            raise SpecError(
                f"spec.source.module.name={name!r} is not 'package.module:function' "
                "(e.g. 'examples.tree_reduction:build')"
            )
        return Source(module=name, args=_mapping(module.get("args"), "spec.source.module.args"))
    if given == ["inline"]:
        inline = source["inline"]
        if not isinstance(inline, str) or not inline.strip():
            raise SpecError("spec.source.inline must be non-empty Python source")
        if len(inline) > MAX_INLINE_SOURCE_CHARS:
            raise SpecError(
                f"spec.source.inline is {len(inline)} characters long: at most "
                f"{MAX_INLINE_SOURCE_CHARS} (256 KiB) are accepted; put a larger workflow in "
                "a module of the worker image (spec.source.module)"
            )
        return Source(inline=inline)
    ref = _mapping(source["ref"], "spec.source.ref")
    dag = ref.get("dag")
    if not isinstance(dag, str) or not _DAG_ID.match(dag):
        raise SpecError(f"spec.source.ref.dag={dag!r} is not a stored DAG id (16-64 hex digits)")
    redis_key = ref.get("redisKey")
    # The operator reads only the key Workflow.submit() writes for this DAG, never another
    # key a Workflow names (the CRD has the same rule).
    if redis_key is not None and redis_key != stored_dag(dag):
        raise SpecError(
            f"spec.source.ref.redisKey={redis_key!r} is not where Workflow.submit() stores DAG "
            f"{dag}: leave it out, or give {stored_dag(dag)!r}"
        )
    return Source(dag=dag, redis_key=redis_key)


SOURCE_KINDS = ("inline", "module", "ref")


def module_allowed(module: str, pattern: str) -> bool:
    """Whether ``module`` ("pkg.mod:function") matches one allowlist ``pattern``: a glob when
    it has ``*``, ``?`` or ``[``, else a package or module prefix (``pkg`` allows
    ``pkg.mod:build`` and ``pkg:build``, not ``pkgx:build``) or the exact ``mod:function``."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(module, pattern)
    if ":" in pattern:
        return module == pattern
    path = module.split(":", 1)[0]
    return path == pattern or path.startswith(pattern + ".")


def check_source(
    source: Source, allowed_sources: frozenset[str] | None, allowed_modules: list[str] | None
) -> None:
    """Raise a SpecError for a source kind the operator does not take (SourceNotAllowed) or a
    module outside its allowlist (ModuleNotAllowed); None: any."""
    if allowed_sources is not None and source.kind not in allowed_sources:
        kinds = ", ".join(k for k in SOURCE_KINDS if k in allowed_sources)
        raise SpecError(
            f"spec.source.{source.kind} is not allowed by this operator; allowed sources: "
            f"{kinds or 'none'}",
            reason=Reason.SOURCE_NOT_ALLOWED,
        )
    if (
        source.module
        and allowed_modules
        and not any(module_allowed(source.module, pattern) for pattern in allowed_modules)
    ):
        raise SpecError(
            f"spec.source.module.name={source.module!r} is not allowed by this operator; "
            f"allowed modules: {', '.join(allowed_modules)}",
            reason=Reason.MODULE_NOT_ALLOWED,
        )


def check_class(mib: int, allowed: list[int] | None) -> None:
    """Raise a SpecError (reason ClassNotAllowed) for a class outside what the operator allows:
    the ``allowed`` list when configured, else 128Mi to 16Gi."""
    if allowed:
        if mib not in allowed:
            listed = ", ".join(f"{m}Mi" for m in allowed)
            raise SpecError(
                f"spec.resources.classes: {mib}Mi is not allowed by this operator; "
                f"allowed classes: {listed}",
                reason=Reason.CLASS_NOT_ALLOWED,
            )
    elif not MIN_CLASS_MIB <= mib <= MAX_CLASS_MIB:
        raise SpecError(
            f"spec.resources.classes: {mib}Mi is not allowed by this operator; "
            f"classes must be between {MIN_CLASS_MIB}Mi and {MAX_CLASS_MIB // 1024}Gi",
            reason=Reason.CLASS_NOT_ALLOWED,
        )


def check_max_workers(max_workers: int | None, limit: int) -> None:
    """Raise a SpecError (reason MaxWorkersAboveLimit) for a ``spec.resources.maxWorkers``
    above the operator's ceiling of worker Pods per run."""
    if max_workers is not None and max_workers > limit:
        raise SpecError(
            f"spec.resources.maxWorkers={max_workers} is above this operator's limit of "
            f"{limit} worker Pods per run; ask for at most {limit}",
            reason=Reason.MAX_WORKERS_ABOVE_LIMIT,
        )


def image_allowed(image: str, pattern: str) -> bool:
    """Whether ``image`` matches one allowlist ``pattern``: a glob when it has ``*``, ``?`` or
    ``[`` (``*`` also matches ``/``), else a prefix that ends where a path segment, tag or
    digest ends (``registry.example.org/team`` allows ``registry.example.org/team/app:1``,
    not ``registry.example.org/teamx/app``)."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(image, pattern)
    if not image.startswith(pattern):
        return False
    return len(image) == len(pattern) or pattern[-1] in "/:@" or image[len(pattern)] in "/:@"


def check_image(image: str, allowed: list[str] | None, default_image: str | None) -> None:
    """Raise a SpecError (reason ImageNotAllowed) for a ``spec.image`` that matches none of the
    ``allowed`` patterns; no list: any image. The operator's default worker image is always
    allowed."""
    if not allowed or image == default_image:
        return
    if not any(image_allowed(image, pattern) for pattern in allowed):
        raise SpecError(
            f"spec.image={image!r} is not allowed by this operator; allowed images: "
            f"{', '.join(allowed)} (or leave spec.image unset for the default worker image)",
            reason=Reason.IMAGE_NOT_ALLOWED,
        )


def parse_spec(
    spec: Any,
    *,
    allowed_classes: list[int] | None = None,
    max_workers_limit: int = MAX_WORKERS,
    allowed_images: list[str] | None = None,
    default_image: str | None = None,
    allowed_sources: frozenset[str] | None = None,
    allowed_modules: list[str] | None = None,
) -> WorkflowSpec:
    """Parse a Workflow's spec (a plain dict), applying the CRD's defaults and the operator's
    limits: its allowed classes, its ceiling of workers per run, its allowed images (any
    when None; ``default_image`` always), source kinds and modules (any when None)."""
    spec = _mapping(spec, "spec")
    source = parse_source(spec.get("source"))
    check_source(source, allowed_sources, allowed_modules)
    planning = _parse_planner(spec.get("planner"))
    resources = _mapping(spec.get("resources"), "spec.resources")
    classes = _parse_classes(resources.get("classes", list(DEFAULT_CLASSES)), allowed_classes)
    try:
        memory_per_cpu = parse_memory(resources.get("memoryPerCpu", "1792Mi"))
    except DagkubeError as exc:
        raise SpecError(f"spec.resources.memoryPerCpu: {exc}") from exc
    max_cpu = resources.get("maxCpu", DEFAULT_MAX_CPU)
    if isinstance(max_cpu, bool) or not isinstance(max_cpu, int | float) or max_cpu < 0.1:
        raise SpecError(f"spec.resources.maxCpu={max_cpu!r} must be a number >= 0.1")
    image = spec.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise SpecError(f"spec.image={image!r} must be a non-empty image reference")
    if image is not None:
        check_image(image, allowed_images, default_image)
    max_workers = _integer(resources.get("maxWorkers"), "spec.resources.maxWorkers", 1, MAX_WORKERS)
    check_max_workers(max_workers, max_workers_limit)
    return WorkflowSpec(
        source=source,
        **planning,
        classes_mib=classes,
        memory_per_cpu_mib=memory_per_cpu,
        max_cpu=float(max_cpu),
        max_workers=max_workers,
        image=image,
        timeout_s=_integer(spec.get("timeoutSeconds"), "spec.timeoutSeconds", 1, MAX_TIMEOUT_S),
        retries=_integer(spec.get("retries"), "spec.retries", 0, 10),
        ttl_after_finished_s=_integer(
            spec.get("ttlSecondsAfterFinished"),
            "spec.ttlSecondsAfterFinished",
            0,
            MAX_TTL_AFTER_FINISHED_S,
        ),
    )


def _parse_planner(value: Any) -> dict[str, Any]:
    """``spec.planner``: the planner's name, the SLA, the optimizations, the objective and
    the GB-s budget, checked; as the :class:`WorkflowSpec` fields they fill."""
    planner = _mapping(value, "spec.planner")
    name = planner.get("name", DEFAULT_PLANNER)
    if name not in PLANNERS:
        raise SpecError(
            f"spec.planner.name={name!r} is unknown: choose one of {', '.join(PLANNERS)} "
            "(optimizations go in spec.planner.optimizations)"
        )
    try:
        sla = parse_sla(planner.get("sla", "avg"))
    except DagkubeError as exc:
        raise SpecError(f"spec.planner.sla: {exc}", reason=Reason.INVALID_SLA) from exc
    optimizations = planner.get("optimizations") or []
    if not isinstance(optimizations, list):
        raise SpecError(f"spec.planner.optimizations={optimizations!r} must be a list")
    try:
        optimizations = check_optimizations(optimizations)
    except DagkubeError as exc:
        raise SpecError(f"spec.planner.optimizations: {exc}") from exc
    try:
        objective = check_objective(planner.get("objective", "makespan"))
    except DagkubeError as exc:
        raise SpecError(f"spec.planner.objective: {exc}") from exc
    max_gb_s = planner.get("maxGbS")
    if isinstance(max_gb_s, bool) or not isinstance(max_gb_s, int | float | None):
        raise SpecError(f"spec.planner.maxGbS={max_gb_s!r} must be a positive number of GB-s")
    try:
        max_gb_s = check_max_gb_s(max_gb_s)
    except DagkubeError as exc:
        raise SpecError(f"spec.planner.maxGbS: {exc}") from exc
    return {
        "planner": name,
        "sla": sla,
        "optimizations": optimizations,
        "objective": objective,
        "max_gb_s": max_gb_s,
    }


def _parse_classes(raw_classes: Any, allowed_classes: list[int] | None) -> list[int]:
    """``spec.resources.classes`` as sorted MiB, each one the operator allows."""
    if not isinstance(raw_classes, list) or not raw_classes:
        raise SpecError(f"spec.resources.classes={raw_classes!r} must be a non-empty list")
    if len(raw_classes) > MAX_CLASSES:
        raise SpecError(
            f"spec.resources.classes lists {len(raw_classes)} classes: at most {MAX_CLASSES}"
        )
    classes: set[int] = set()
    for raw in raw_classes:
        try:
            mib = parse_memory(raw)
        except DagkubeError as exc:
            raise SpecError(
                f"spec.resources.classes: {exc}", reason=Reason.CLASS_NOT_ALLOWED
            ) from exc
        check_class(mib, allowed_classes)
        classes.add(mib)
    return sorted(classes)
