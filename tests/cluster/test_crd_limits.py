"""The Workflow CRD's hard limits and CEL rules, enforced by the real API server.

Every string, list, map and number of ``spec`` is bounded, a source is exactly one of module,
inline or ref, and ``spec`` cannot change once the Workflow exists (except
``ttlSecondsAfterFinished``). A seeded mutation test then throws 2,000 damaged specs at the API
server (server-side dry-run: nothing is stored): each is refused naming a field, or accepted
and then parsed by the operator's own parser into a spec or a ``SpecError``, never a crash.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import json
import random
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config

from dagkube_operator.spec import SpecError, parse_spec
from tests.kube import Kube

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
CRD_FILE = ROOT / "crds" / "workflow.yaml"
CRD_NAME = "workflows.dagkube.io"
GROUP, VERSION, PLURAL = "dagkube.io", "v1alpha1", "workflows"
MUTATIONS = 2000
CONCURRENT_REQUESTS = 8
HEX_ID = "0123456789abcdef"


def workflow(spec: Any, name: str = "limits") -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "Workflow",
        "metadata": {"name": name},
        "spec": spec,
    }


def valid_specs() -> list[dict[str, Any]]:
    """The example manifests' specs, those the cluster and unit tests run, and one that sets
    every field: all must stay valid under the limits."""
    manifests = sorted(ROOT.glob("examples/manifests/*.yaml"))
    examples = [yaml.safe_load(path.read_text())["spec"] for path in manifests]
    return [
        *examples,
        {"source": {"ref": {"dag": HEX_ID}}},
        {
            "source": {"module": {"name": "examples.unequal_branches:build"}},
            "planner": {"name": "non-uniform", "sla": "p90"},
            "resources": {"classes": ["512Mi", "1Gi", "2Gi"]},
        },
        {
            "source": {"inline": "x = 1\n"},
            "timeoutSeconds": 8,
            "retries": 0,
            "resources": {"classes": ["512Mi"], "maxCpu": 0.5},
        },
        {
            "source": {
                "module": {"name": "examples.tree_reduction:build", "args": {"width": 8, "x": [1]}}
            },
            "planner": {
                "name": "uniform",
                "sla": "p99.9",
                "optimizations": ["preload", "prewarm"],
                "objective": "balanced",
                "maxGbS": 50,
            },
            "resources": {
                "classes": ["256Mi", "4Gi"],
                "memoryPerCpu": "1Gi",
                "maxCpu": 2.5,
                "maxWorkers": 20,
            },
            "image": "registry.example.org/dagkube/worker:1.2.3",
            "timeoutSeconds": 600,
            "retries": 3,
            "ttlSecondsAfterFinished": 60,
        },
        {"source": {"ref": {"dag": "f" * 64, "redisKey": "dk:dag:" + "f" * 64}}},
    ]


class WorkflowApi:
    """Workflow calls on one API client: a dry-run create answers (status, body)."""

    def __init__(self, api: k8s.ApiClient, namespace: str) -> None:
        self.objects = k8s.CustomObjectsApi(api)
        self.namespace = namespace

    async def call(self, method: str, *args: Any, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        try:
            body = await getattr(self.objects, method)(
                GROUP, VERSION, self.namespace, PLURAL, *args, **kwargs
            )
        except k8s.ApiException as error:
            return error.status, json.loads(error.body or "null")
        return 200, body

    async def dry_run_create(self, spec: Any) -> tuple[int, dict[str, Any]]:
        return await self.call("create_namespaced_custom_object", workflow(spec), dry_run="All")

    async def merge_patch(self, name: str, patch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        # Custom resources take no strategic merge patch, the client's choice for a dict.
        return await self.call(
            "patch_namespaced_custom_object",
            name,
            patch,
            _content_type="application/merge-patch+json",
        )


def refused_fields(status: int, body: dict[str, Any]) -> list[str]:
    """The fields an API error names: its causes' fields (422), or the field a decoding error
    quotes (400); empty when the error names none."""
    if status == 422:
        causes = (body.get("details") or {}).get("causes") or []
        return [c["field"] for c in causes if c.get("field", "").startswith("spec")]
    if status == 400:
        message = body.get("message", "")
        return [word.strip('"') for word in message.split() if word.strip('"').startswith("spec")]
    return []


@pytest.fixture(scope="module")
def namespace(local_cluster: Kube) -> Iterator[str]:
    """This checkout's CRD installed (removed again if this module installed it, so that a
    later `helm install` can own it) and a namespace of the module's own."""
    installed_before = local_cluster.get("crd", CRD_NAME, "") is not None
    local_cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD_FILE))
    local_cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}")
    name = f"limits-{uuid.uuid4().hex[:6]}"
    local_cluster.kubectl("create", "namespace", name)
    yield name
    local_cluster.kubectl("delete", "namespace", name, "--wait=false")
    if not installed_before:
        local_cluster.kubectl("delete", "crd", CRD_NAME, "--timeout=60s")


@pytest.fixture
async def workflows(local_cluster: Kube, namespace: str) -> AsyncIterator[WorkflowApi]:
    api = await config.new_client_from_config(config_file=str(local_cluster.kubeconfig))
    try:
        yield WorkflowApi(api, namespace)
    finally:
        await api.close()


async def test_valid_specs_are_accepted_and_parse(workflows: WorkflowApi) -> None:
    for spec in valid_specs():
        status, body = await workflows.dry_run_create(spec)
        assert status == 200, (spec, body)
        parse_spec(body["spec"])


def over(spec: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``spec`` with the dotted ``path`` set to ``value`` (intermediate objects created)."""
    spec = copy.deepcopy(spec)
    *parents, last = path.split(".")
    node = spec
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return spec


MODULE = {"source": {"module": {"name": "examples.tree_reduction:build"}}}
INLINE = {"source": {"inline": "x = 1\n"}}
# (spec, the field the API server names, words of its message); each limit is also checked
# right at its bound, where the same spec must pass.
OVER_LIMIT = {
    "long-module-name": (
        over(MODULE, "source.module.name", "a" * 250 + ":build"),
        "spec.source.module.name", "may not be more than 253",
    ),
    "huge-inline-source": (
        over(INLINE, "source.inline", "#" * (256 * 1024 + 1)),
        "spec.source.inline", "may not be more than 262144",
    ),
    "400-digit-class": (
        over(INLINE, "resources.classes", ["9" * 400 + "Mi"]),
        "spec.resources.classes[0]", "may not be more than 32",
    ),
    "17-classes": (
        over(INLINE, "resources.classes", [f"{512 + i}Mi" for i in range(17)]),
        "spec.resources.classes", "must have at most 16 items",
    ),
    "8-day-timeout": (
        over(INLINE, "timeoutSeconds", 8 * 24 * 3600),
        "spec.timeoutSeconds", "less than or equal to 604800",
    ),
    "timeout-past-int64": (
        over(INLINE, "timeoutSeconds", 2**64),
        "spec.timeoutSeconds", "less than or equal to 604800",
    ),
    "10001-workers": (
        over(INLINE, "resources.maxWorkers", 10_001),
        "spec.resources.maxWorkers", "less than or equal to 10000",
    ),
    "huge-max-cpu": (
        over(INLINE, "resources.maxCpu", 1e9),
        "spec.resources.maxCpu", "less than or equal to 1024",
    ),
    "ttl-over-a-year": (
        over(INLINE, "ttlSecondsAfterFinished", 366 * 24 * 3600),
        "spec.ttlSecondsAfterFinished", "less than or equal to 31536000",
    ),
    "long-image": (
        over(INLINE, "image", "registry.example.org/" + "a" * 1010),
        "spec.image", "may not be more than 1024",
    ),
    "65-module-args": (
        over(MODULE, "source.module.args", {f"a{i}": i for i in range(65)}),
        "spec.source.module.args", "must have at most 64 items",
    ),
    "long-sla": (
        over(INLINE, "planner.sla", "p99." + "9" * 20),
        "spec.planner.sla", "may not be more than 16",
    ),
    "two-sources": (
        over(INLINE, "source.ref", {"dag": HEX_ID}),
        "spec.source", "exactly one of module, inline or ref must be set",
    ),
    "no-source": ({"source": {}}, "spec.source", "exactly one of module, inline or ref"),
    "ref-to-another-key": (
        {"source": {"ref": {"dag": HEX_ID, "redisKey": "dk:run:x:out"}}},
        "spec.source.ref.redisKey", "should match",
    ),
    "ref-to-another-dag": (
        {"source": {"ref": {"dag": HEX_ID, "redisKey": "dk:dag:" + "0" * 32}}},
        "spec.source.ref", "redisKey can only be where Workflow.submit() stores the DAG",
    ),
}  # fmt: skip
AT_LIMIT = {
    "long-module-name": over(MODULE, "source.module.name", "a" * 247 + ":build"),
    "huge-inline-source": over(INLINE, "source.inline", "#" * (256 * 1024)),
    "17-classes": over(INLINE, "resources.classes", [f"{512 + i}Mi" for i in range(16)]),
    "8-day-timeout": over(INLINE, "timeoutSeconds", 7 * 24 * 3600),
    "10001-workers": over(INLINE, "resources.maxWorkers", 10_000),
    "huge-max-cpu": over(INLINE, "resources.maxCpu", 1024),
    "ttl-over-a-year": over(INLINE, "ttlSecondsAfterFinished", 365 * 24 * 3600),
    "long-image": over(INLINE, "image", "registry.example.org/" + "a" * 1003),
    "65-module-args": over(MODULE, "source.module.args", {f"a{i}": i for i in range(64)}),
    "long-sla": over(INLINE, "planner.sla", "p99." + "9" * 12),
}


@pytest.mark.parametrize("case", OVER_LIMIT)
async def test_a_value_over_a_limit_is_refused_naming_the_field(
    workflows: WorkflowApi, case: str
) -> None:
    spec, field, words = OVER_LIMIT[case]
    status, body = await workflows.dry_run_create(spec)
    assert status == 422, body
    causes = body["details"]["causes"]
    assert any(c.get("field") == field and words in c["message"] for c in causes), causes
    if case in AT_LIMIT:
        status, body = await workflows.dry_run_create(AT_LIMIT[case])
        assert status == 200, body
        assert parse_spec(body["spec"]).source.kind in {"module", "inline"}


def crd_spec_schema() -> dict[str, Any]:
    [version] = yaml.safe_load(CRD_FILE.read_text())["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


async def test_the_spec_cannot_change_once_the_workflow_exists(workflows: WorkflowApi) -> None:
    name = "immutable"
    spec = valid_specs()[-2]  # every field set
    status, body = await workflows.call("create_namespaced_custom_object", workflow(spec, name))
    assert status == 200, body
    changes = {
        "timeoutSeconds": {"timeoutSeconds": 30},
        "retries removed": {"retries": None},
        "the image": {"image": "other:1"},
        "an SLA": {"planner": {"sla": "p50"}},
        "a class": {"resources": {"classes": ["8Gi"]}},
        "the module's args": {"source": {"module": {"args": {"width": 9}}}},
        "the source's kind": {"source": {"module": None, "ref": {"dag": HEX_ID}}},
    }
    for what, patch in changes.items():
        status, body = await workflows.merge_patch(name, {"spec": patch})
        assert status == 422, (what, body)
        [cause] = body["details"]["causes"]
        assert cause["field"] == "spec" and "spec is immutable" in cause["message"], what
    # What may change: the TTL (like a Job's), and metadata.
    status, body = await workflows.merge_patch(
        name, {"spec": {"ttlSecondsAfterFinished": 5}, "metadata": {"labels": {"team": "a"}}}
    )
    assert status == 200, body
    assert body["spec"]["ttlSecondsAfterFinished"] == 5
    assert body["metadata"]["labels"] == {"team": "a"}
    assert {k: v for k, v in body["spec"].items() if k != "ttlSecondsAfterFinished"} == {
        k: v for k, v in spec.items() if k != "ttlSecondsAfterFinished"
    }


# ---------------------------------------------------------------- seeded mutations
def schema_paths(schema: dict[str, Any], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every field the spec's schema declares, as key paths."""
    for name, child in schema.get("properties", {}).items():
        yield (*path, name)
        yield from schema_paths(child, (*path, name))


JUNK_KINDS = ("str", "str", "huge-str", "int", "huge-int", "float", "bool", "null", "list", "dict")
# Some pass the schema and only the operator refuses: 0Mi, 1Mi and 64Gi (ClassNotAllowed), a
# 25-digit class (too large for any machine).
SHORT_STRINGS = ("", " ", "x", "512Mi", "0Mi", "1Mi", "1Gi", "64Gi", "9" * 25 + "Gi", "p99",
                 "p100", "avg", "a.b:c", "wukong", "prewarm", HEX_ID, "ü" * 40,
                 "9" * 400 + "Mi", "-1")  # fmt: skip


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A value of any JSON type: right or wrong types, huge, negative, nested."""
    kind = rng.choice(JUNK_KINDS)
    if kind == "str":
        return rng.choice(SHORT_STRINGS)
    if kind == "huge-str":
        return rng.choice("x9#ü") * rng.choice([254, 1025, 5000, 262_145])
    if kind == "int":
        return rng.choice([0, 1, -1, 10, 16, 17, 10_000, 10_001, 604_800, 604_801])
    if kind == "huge-int":
        return rng.choice([-(2**31), 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30])
    if kind == "float":
        return rng.choice([0.0, 0.05, 0.1, -0.5, 1.5, 1024.5, 1e308, -1e308, 5e-324])
    if kind == "bool":
        return rng.random() < 0.5
    if kind == "null":
        return None
    if depth >= 3:
        return {}
    if kind == "list":
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    keys = ("a", "name", "dag", "zz", "$x", "")
    return {rng.choice(keys): junk(rng, depth + 1) for _ in range(rng.randint(0, 3))}


def nodes(value: Any, path: tuple[Any, ...] = ()) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """Every node of a JSON value with its path (keys and list indexes)."""
    yield path, value
    if isinstance(value, dict):
        children: Any = value.items()
    elif isinstance(value, list):
        children = enumerate(value)
    else:
        children = ()
    for key, child in children:
        yield from nodes(child, (*path, key))


def mutate(spec: dict[str, Any], rng: random.Random, declared: list[tuple[str, ...]]) -> Any:
    """One random damage to a deep copy of ``spec`` (the root itself may be replaced)."""
    spec = copy.deepcopy(spec)
    present = [path for path, _ in nodes(spec) if path]
    kind = rng.choice(["delete", "set", "set", "set-declared", "duplicate", "unknown", "root"])
    if kind == "root":
        return junk(rng)
    if kind == "set-declared":  # a field of the schema, present or not: mostly wrong values
        path: tuple[Any, ...] = rng.choice(declared)
        node = spec
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        node[path[-1]] = junk(rng)
        return spec
    if kind in ("delete", "set") and not present:
        kind = "unknown"
    if kind == "duplicate":
        lists = [(p, v) for p, v in nodes(spec) if isinstance(v, list) and v]
        if lists:
            _, found = rng.choice(lists)
            found.append(copy.deepcopy(rng.choice(found)))
            return spec
        kind = "unknown"
    if kind == "unknown":
        objects = [v for _, v in nodes(spec) if isinstance(v, dict)]
        rng.choice(objects)[rng.choice(["zz", "Source", "inline2", "x-y"])] = junk(rng)
        return spec
    path = rng.choice(present)
    parent = spec
    for key in path[:-1]:
        parent = parent[key]
    if kind == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = junk(rng)
    return spec


def seeded_mutants(seed: int = 17, count: int = MUTATIONS) -> list[Any]:
    """``count`` damaged specs, the same for the same seed: a valid spec, damaged 1 to 3 times
    (tests/cluster/test_mutations.py applies the same ones to a running operator)."""
    rng = random.Random(seed)
    bases = valid_specs()
    declared = list(schema_paths(crd_spec_schema()))
    mutants = []
    for _ in range(count):
        mutant = rng.choice(bases)
        for _ in range(rng.choice([1, 1, 1, 2, 3])):
            if not isinstance(mutant, dict):
                break
            mutant = mutate(mutant, rng, declared)
        mutants.append(mutant)
    return mutants


async def test_seeded_mutations_are_refused_or_parse_without_crashing(
    workflows: WorkflowApi,
) -> None:
    """2,000 damaged specs: each refused by the API server naming a field, or accepted and
    then parsed by the operator into a spec or a SpecError (never another exception)."""
    mutants = seeded_mutants()
    gate = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def submit(mutant: Any) -> tuple[int, dict[str, Any]]:
        async with gate:
            return await workflows.dry_run_create(mutant)

    began = time.monotonic()
    answers = await asyncio.gather(*(submit(mutant) for mutant in mutants))
    elapsed_s = time.monotonic() - began
    outcomes: collections.Counter[str] = collections.Counter()
    problems = []
    for mutant, (status, body) in zip(mutants, answers, strict=True):
        shown = json.dumps(mutant)[:300]
        if status != 200:
            if status not in (400, 422) or not refused_fields(status, body):
                problems.append(f"refused without naming a field ({status}): {shown} -> {body}")
            outcomes["refused by the API server"] += 1
            continue
        try:
            parse_spec(body["spec"])
        except SpecError:
            outcomes["accepted, then a SpecError"] += 1
        except Exception as exc:  # the point of the test: anything else is a crash
            problems.append(f"the parser crashed ({exc!r}) on {json.dumps(body['spec'])[:300]}")
        else:
            outcomes["accepted and parsed"] += 1
    print(f"{MUTATIONS} mutations in {elapsed_s:.1f}s: {dict(outcomes)}")
    assert problems == []
    assert set(outcomes) == {
        "refused by the API server",
        "accepted, then a SpecError",
        "accepted and parsed",
    }, outcomes
