"""Issue 17's mutation acceptance on a running operator: the 2,000 seeded damaged specs of
tests/cluster/test_crd_limits.py are created for real. Each is refused by the API server's
schema (naming a field), or the operator ends it ``Failed`` with a reason of its fixed set and
a Warning Event carrying that reason; the operator never restarts, and afterwards still runs a
good Workflow.

The release allows only ``ref`` sources (``operator.allowedSources``), so damaged module and
inline specs end at the allowlist instead of each starting a build Pod (what builds do with
bad input is tested in test_operator.py and tests/integration/test_builds.py); damaged ref
specs name DAGs that do not exist.
"""

from __future__ import annotations

import asyncio
import collections
import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config

from dagkube import description
from dagkube.kubernetes.submit import dag_id
from dagkube.store.keys import stored_dag
from dagkube_operator.reasons import Reason
from examples import tree_reduction
from tests.cluster.test_crd_limits import GROUP, PLURAL, VERSION, refused_fields, seeded_mutants
from tests.cluster.test_resilience import operator_requests
from tests.kube import Kube, wait_for
from tests.release import Release, installed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(1200)]

CONCURRENT_REQUESTS = 8
ALL_FAILED_WITHIN_S = 600.0


@pytest.fixture(scope="module")
def release(local_cluster: Kube) -> Iterator[Release]:
    with installed(local_cluster, {"operator.allowedSources": "{ref}"}) as release:
        yield release


async def create_all(release: Release, specs: list[Any]) -> list[tuple[int, dict[str, Any]]]:
    api = await config.new_client_from_config(config_file=str(release.kube.kubeconfig))
    objects = k8s.CustomObjectsApi(api)
    gate = asyncio.Semaphore(CONCURRENT_REQUESTS)

    async def create(index: int, spec: Any) -> tuple[int, dict[str, Any]]:
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workflow",
            "metadata": {"name": f"m-{index:04d}"},
            "spec": spec,
        }
        async with gate:
            try:
                await objects.create_namespaced_custom_object(
                    GROUP, VERSION, release.namespace, PLURAL, body
                )
            except k8s.ApiException as error:
                return error.status, json.loads(error.body or "null") or {}
            return 200, {}

    try:
        return await asyncio.gather(*(create(i, spec) for i, spec in enumerate(specs)))
    finally:
        await api.close()


def restarts(release: Release) -> int:
    pod = release.operator_pod()
    assert pod is not None, "the operator is not running"
    return sum(c.get("restartCount", 0) for c in pod["status"]["containerStatuses"])


def test_every_mutation_is_refused_or_ends_failed_with_a_reason_and_an_event(
    release: Release,
) -> None:
    restarts_before = restarts(release)
    operator_uid = release.operator_pod()["metadata"]["uid"]  # type: ignore[index]
    specs = seeded_mutants()
    began = time.monotonic()
    answers = asyncio.run(create_all(release, specs))
    problems = []
    accepted = []
    for index, (status, body) in enumerate(answers):
        if status == 200:
            accepted.append(f"m-{index:04d}")
        elif status not in (400, 422) or not refused_fields(status, body):
            problems.append(f"m-{index:04d} refused without naming a field ({status}): {body}")
    assert problems == []
    assert 300 < len(accepted) < len(specs), len(accepted)

    def phases() -> dict[str, str]:
        items = release.kube.list("workflows", release.namespace)
        return {w["metadata"]["name"]: (w.get("status") or {}).get("phase", "") for w in items}

    # A spec with ttlSecondsAfterFinished is deleted that long after it ended (its Events stay).
    ttl = {
        f"m-{index:04d}"
        for index, spec in enumerate(specs)
        if isinstance(spec, dict) and "ttlSecondsAfterFinished" in spec
    }

    def all_ended() -> bool:
        found = phases()
        return all(
            found.get(name) in ("Failed", "Succeeded") or (name not in found and name in ttl)
            for name in accepted
        )

    wait_for(all_ended, ALL_FAILED_WITHIN_S, f"{len(accepted)} accepted Workflows to end")
    took = time.monotonic() - began
    ended = phases()
    kept = [name for name in accepted if name in ended]
    assert {ended[name] for name in kept} == {"Failed"}, collections.Counter(ended.values())
    known = {reason.value for reason in Reason}
    reasons: collections.Counter[str] = collections.Counter()
    warnings: dict[str, set[str]] = collections.defaultdict(set)
    for event in release.kube.list("events", release.namespace):
        if event.get("type") == "Warning":
            warnings[(event.get("involvedObject") or {}).get("name", "")].add(event["reason"])
    workflows = {
        w["metadata"]["name"]: w for w in release.kube.list("workflows", release.namespace)
    }
    for name in accepted:
        workflow = workflows.get(name)
        if workflow is None:  # ended, then deleted by its TTL: its Warning Event tells why
            [reason] = warnings[name] or {"(no Warning Event)"}
        else:
            [condition] = [c for c in workflow["status"]["conditions"] if c["type"] == "Succeeded"]
            reason = condition["reason"]
            assert workflow["status"]["message"], name
            assert reason in warnings[name], (name, reason, warnings[name])
        reasons[reason] += 1
        assert reason in known and reason not in ("Succeeded", "Started"), (name, reason)
    # Nothing loops: once they all ended, the operator leaves them alone (a quiet 10 s holds
    # its peering keep-alives and a few status reads, not one request per Workflow).
    quiet_from = time.time() + 2
    time.sleep(12)
    quiet = operator_requests(release, quiet_from, quiet_from + 10)
    print(
        f"{len(specs)} mutations: {len(specs) - len(accepted)} refused by the API server, "
        f"{len(accepted)} ended Failed in {took:.0f}s ({len(accepted) - len(kept)} then deleted "
        f"by their TTL): {dict(reasons)}; operator API requests in the next 10 s: {quiet}"
    )
    assert quiet < 50, f"the operator made {quiet} API requests in 10 s after every Workflow ended"
    assert restarts(release) == restarts_before
    assert release.operator_pod()["metadata"]["uid"] == operator_uid  # type: ignore[index]

    # still serving: a good Workflow from a DAG stored as wf.submit() stores it (examples are
    # importable in the worker image)
    wf = tree_reduction.build()
    dag = dag_id(wf.dag)
    with release.store.pipeline(transaction=True) as pipe:
        description.store(pipe, stored_dag(dag), wf.dag, ttl_s=600)
        pipe.execute()
    release.apply(release.workflow("after-mutations", {"ref": {"dag": dag}}))
    status = release.wait_phase("after-mutations")
    assert status["phase"] == "Succeeded", status
    assert release.output_of(status["runId"], wf.dag.output_ids[0]) == sum(tree_reduction.LEAVES)
