"""Worker Pods that outlive a Workflow: two Workflows of a namespace with the same Pod settings
share one pool, so the second's tasks run on the idle Pods the first left (warm starts, no Pod
created for it); deleting the first keeps the Pods that serve others; the idle Pods exit by
themselves after the operator's idle timeout and the pool's scaler removes them."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from dagkube.kubernetes.pods import LABEL_POOL
from dagkube.store.keys import hist_run
from dagkube.store.records import WorkerRecord
from tests.cluster.test_operator import sleepy
from tests.kube import Kube, wait_for
from tests.release import Release, installed

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

# Long enough for the second Workflow to build its DAG and launch on a loaded machine while the
# first one's Pods wait idle.
IDLE_TIMEOUT_S = 45


@pytest.fixture(scope="module")
def release(local_cluster: Kube) -> Iterator[Release]:
    with installed(local_cluster, {"operator.idleTimeoutSeconds": IDLE_TIMEOUT_S}) as release:
        yield release


def worker_records(release: Release, run_id: str) -> list[WorkerRecord]:
    raw = release.store.hgetall(hist_run(run_id, "workers")).values()
    return [WorkerRecord.model_validate_json(value) for value in raw]


def test_the_next_workflow_runs_on_the_idle_pods_of_the_last(release: Release) -> None:
    kube, ns = release.kube, release.namespace

    def workflow(name: str, width: int) -> dict:
        return release.workflow(
            name,
            {"inline": sleepy(name, 0.5, width)},
            planner={"name": "wukong"},
            resources={"classes": ["512Mi"], "maxWorkers": 4},
            timeoutSeconds=300,
        )

    release.apply(workflow("warm-first", 2))
    first = release.wait_phase("warm-first")
    assert first["phase"] == "Succeeded", first
    created = {p["metadata"]["name"]: p for p in release.seen_pods(first["runId"])}
    assert created, "the first Workflow created no Pod"
    # Its Pods belong to the pool's ConfigMap, not to the Workflow: they outlive it.
    owners = {
        (ref["kind"], ref["name"])
        for p in created.values()
        for ref in p["metadata"]["ownerReferences"]
    }
    [(kind, owner)] = owners
    assert kind == "ConfigMap" and owner.startswith("dagkube-worker-pool-wp-"), owners
    pool_object = kube.get("configmap", owner, ns)
    assert pool_object is not None
    [pool_label] = {p["metadata"]["labels"][LABEL_POOL] for p in created.values()}

    # Another workflow (one task less: it needs no more workers than are idle) of the same
    # Pod settings: the pool's idle Pods serve any run of the pool.
    release.apply(workflow("warm-second", 1))
    second = release.wait_phase("warm-second")
    assert second["phase"] == "Succeeded", second
    assert release.seen_pods(second["runId"]) == [], "a Pod was created for the second run"
    records = worker_records(release, second["runId"])
    assert records and {r.worker_id for r in records} <= set(created), records
    assert not any(r.cold for r in records), records
    assert second["workers"]["warm"] == len(records) and second["workers"]["cold"] == 0
    ended_at = time.monotonic()

    # Deleting the first Workflow leaves the pool's idle Pods (they serve the namespace).
    kube.kubectl("delete", "workflow", "warm-first", "-n", ns, "--wait=true")
    alive = kube.list("pods", ns, f"{LABEL_POOL}={pool_label}")
    assert {p["metadata"]["name"] for p in alive} & set(created), "idle Pods were deleted"

    # Within the idle timeout (and the scaler's grace) they exit by themselves and go.
    wait_for(
        lambda: not kube.list("pods", ns, f"{LABEL_POOL}={pool_label}"),
        IDLE_TIMEOUT_S + 90,
        "the pool's idle Pods to go after the idle timeout",
    )
    assert time.monotonic() - ended_at >= IDLE_TIMEOUT_S - 15, "Pods went before the timeout"
    stopped = [p for name, p in release.recorder.pods.items() if name in created]
    assert all(p["status"].get("phase") != "Failed" for p in stopped), stopped
