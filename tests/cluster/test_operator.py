"""dagkube on the local control plane: the chart installed with the real helm, the operator
running as a Pod under its ServiceAccount and the chart's Role, Redis as a StatefulSet with a
claimed volume, Workflows applied with the real kubectl and worker Pods run by the node agent
under their memory and CPU limits. One release serves the module's tests (distinct names)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from localcluster.agent.quantity import cpu_millis, memory_bytes

from dagkube.kubernetes.pods import LABEL_CLASS
from dagkube.resources import cpu_millicores, parse_memory
from dagkube.store.keys import RunKeys, hist_run
from dagkube.store.records import TaskRecord, WorkerRecord
from dagkube_operator.handlers import run_id_for
from tests.kube import Kube, wait_for
from tests.release import (
    OPERATOR_IMAGE,
    RELEASE,
    ROOT,
    RUN_TIMEOUT_S,
    WORKER_IMAGE,
    Release,
    installed,
)

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(600)]

PENDING_TIMEOUT_S = 20
BUILD_TIMEOUT_S = 15

SLEEPY = """
import time
import dagkube


@dagkube.task
def nap(seconds: float, index: int) -> int:
    time.sleep(seconds)
    return index * index


@dagkube.task
def total(values: list[int]) -> int:
    return sum(values)


def build() -> dagkube.Workflow:
    return dagkube.Workflow(total([nap({seconds}, i) for i in range({width})]), name="{name}")
"""

LONG_THEN_WIDE = """
import time
import dagkube


@dagkube.task
def prepare() -> list[int]:
    time.sleep(3.0)
    return list(range(4))


@dagkube.task
def part(items: list[int], index: int) -> int:
    time.sleep(2.0)
    return items[index] ** 2


@dagkube.task
def combine(parts: list[int]) -> int:
    return sum(parts)


def build() -> dagkube.Workflow:
    items = prepare()
    return dagkube.Workflow(combine([part(items, i) for i in range(4)]), name="long-then-wide")
"""


HOG = """
import dagkube


@dagkube.task
def hog(mib: int) -> int:
    block = b"x" * (mib * 1024 * 1024)
    return len(block) // (1024 * 1024)


@dagkube.task
def after(x: int) -> int:
    return x + 1


def build() -> dagkube.Workflow:
    return dagkube.Workflow(after(hog({mib})), name="{name}")
"""


def sleepy(name: str, seconds: float, width: int) -> str:
    return SLEEPY.format(seconds=seconds, width=width, name=name)


@pytest.fixture(scope="module")
def release(local_cluster: Kube) -> Iterator[Release]:
    values = {
        "operator.idleTimeoutSeconds": 15,
        "operator.pendingTimeoutSeconds": PENDING_TIMEOUT_S,
        "operator.buildTimeoutSeconds": BUILD_TIMEOUT_S,
    }
    with installed(local_cluster, values) as release:
        yield release


def check_pod(pod: dict[str, Any], max_cpu: float = 6.0) -> int:
    """A worker Pod as the API server stored it: resources follow its class, it runs locked
    down, its owner is its shared pool's ConfigMap; returns its class."""
    memory = parse_memory(pod["metadata"]["labels"][LABEL_CLASS])
    [container] = pod["spec"]["containers"]
    millicores = cpu_millicores(memory, 1792, max_cpu)
    resources = container["resources"]
    assert set(resources) == {"requests", "limits"}
    for kind in ("requests", "limits"):  # as the API server stored them (2048Mi becomes 2Gi)
        assert memory_bytes(resources[kind]["memory"]) == memory * 2**20, resources
        assert cpu_millis(resources[kind]["cpu"]) == millicores, resources
    assert pod["spec"]["automountServiceAccountToken"] is False
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [owner] = pod["metadata"]["ownerReferences"]
    assert owner["kind"] == "ConfigMap" and owner["name"].startswith("dagkube-worker-pool-wp-")
    assert pod["status"]["qosClass"] == "Guaranteed"
    return memory


def served_pods(release: Release, run_id: str) -> list[dict[str, Any]]:
    """Every worker Pod that served the run (its worker records name them), as last seen."""
    raw = release.store.hvals(hist_run(run_id, "workers"))
    names = {WorkerRecord.model_validate_json(value).worker_id for value in raw}
    return [pod for name, pod in release.recorder.pods.items() if name in names]


def no_live_worker_pods(release: Release) -> bool:
    """No worker Pod of the namespace is alive (Failed ones stay for their logs)."""
    pods = release.kube.list("pods", release.namespace, "dagkube.io/component=worker")
    return all(p["status"].get("phase") == "Failed" for p in pods)


def test_the_chart_runs_the_operator_under_its_service_account(release: Release) -> None:
    kube, ns = release.kube, release.namespace
    crd = kube.get("crd", "workflows.dagkube.io", "")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True" and established["NamesAccepted"] == "True"
    operator = release.operator_pod()
    assert operator is not None
    assert operator["spec"]["serviceAccountName"] == RELEASE
    assert operator["spec"]["containers"][0]["image"] == f"{OPERATOR_IMAGE}:dev"
    [ready] = [c for c in operator["status"]["conditions"] if c["type"] == "Ready"]
    assert ready["status"] == "True"  # its readiness probe (GET /healthz) passes
    statefulset = kube.get("statefulset", f"{RELEASE}-redis", ns)
    assert statefulset["status"]["readyReplicas"] == 1
    [claim] = kube.list("persistentvolumeclaims", ns)
    assert claim["status"]["phase"] == "Bound"
    metrics = kube.kubectl(
        "get", "--raw", f"/api/v1/namespaces/{ns}/services/{RELEASE}-metrics:metrics/proxy/metrics"
    ).stdout
    assert "dagkube_operator_reconcile_errors_total" in metrics


def test_module_inline_and_non_uniform_workflows_succeed(release: Release) -> None:
    tree = release.manifest("examples/manifests/workflow-module.yaml")
    inline = release.manifest("examples/manifests/workflow-inline.yaml")
    # The inline one on the 2Gi class with a CPU cap: 2Gi / 1792Mi = 1143m, capped at 500m.
    inline["spec"]["resources"] = {"classes": ["2Gi"], "maxCpu": 0.5}
    branches = release.workflow(
        "unequal-branches",
        {"module": {"name": "examples.unequal_branches:build"}},
        planner={"name": "non-uniform", "sla": "p90"},
        # A pool of its own (maxCpu shapes its Pods; no class here reaches 5 cores): the idle
        # Pods of the tree's pool would otherwise run it warm on one class, as they should.
        resources={"classes": ["512Mi", "1Gi", "2Gi"], "maxCpu": 5.0},
    )
    for body in (tree, inline, branches):
        release.apply(body)
    statuses = {
        body["metadata"]["name"]: release.wait_phase(body["metadata"]["name"])
        for body in (tree, inline, branches)
    }
    for name, status in statuses.items():
        assert status["phase"] == "Succeeded", (name, status)
        assert status["tasks"]["done"] == status["tasks"]["total"] > 0
        assert status["actualMakespanSeconds"] > 0 and status["predictedMakespanSeconds"] > 0
        assert status["resources"]["gbSeconds"] > 0
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Succeeded"]["status"] == "True"
        reasons = {(kind, reason) for kind, reason, _ in release.events(name)}
        assert {("Normal", "Started"), ("Normal", "Succeeded")} <= reasons, reasons

    import examples.tree_reduction as tree_module
    import examples.unequal_branches as branches_module

    [tree_output] = tree_module.build().dag.output_ids
    tree_module.verify(release.output_of(statuses["tree-reduction"]["runId"], tree_output))
    assert release.output_of(statuses["sum-of-squares"]["runId"], "total#0") == 204
    [branches_output] = branches_module.build().dag.output_ids
    branches_module.verify(
        release.output_of(statuses["unequal-branches"]["runId"], branches_output)
    )

    for name, status in statuses.items():
        pods = served_pods(release, status["runId"])  # the pool's Pods serve any of its runs
        assert pods, f"no worker Pods seen for {name}"
        max_cpu = {"sum-of-squares": 0.5, "unequal-branches": 5.0}.get(name, 6.0)
        classes = {check_pod(p, max_cpu=max_cpu) for p in pods}
        if name == "sum-of-squares":
            assert classes == {2048}
            assert {p["spec"]["containers"][0]["resources"]["limits"]["cpu"] for p in pods} == {
                "500m"
            }
        if name == "unequal-branches":
            assert len(classes) > 1, f"non-uniform used one class only: {classes}"

    table = release.kube.kubectl("get", "dkwf", "-n", release.namespace).stdout
    header = table.splitlines()[0].split()
    for column in (
        "PHASE",
        "PLANNER",
        "DONE",
        "TOTAL",
        "MAKESPAN",
        "PRED-MAKESPAN",
        "GB-S",
        "PRED-GB-S",
    ):
        assert column in header, header
    [row] = [line.split() for line in table.splitlines()[1:] if line.startswith("sum-of-squares ")]
    shown = dict(zip(header, row, strict=False))
    assert float(shown["GB-S"]) > 0 and float(shown["PRED-GB-S"]) > 0, shown
    described = release.kube.kubectl(
        "describe", "dkwf", "sum-of-squares", "-n", release.namespace
    ).stdout
    assert "Started" in described and "Succeeded" in described


def test_bad_specs_are_refused_by_the_api_server_or_end_failed(release: Release) -> None:
    schema_bad = release.workflow("bad-sla", {"inline": "x = 1\n"}, planner={"sla": "p100"})
    refused = release.kube.kubectl("apply", "-f", "-", input=json.dumps(schema_bad), check=False)
    assert refused.returncode != 0 and "sla" in refused.stderr, refused.stderr
    cases = {
        "unknown-module": (
            release.workflow("unknown-module", {"module": {"name": "nosuch.module:build"}}),
            "ModuleNotFound",
        ),
        "huge-class": (
            release.workflow("huge-class", {"inline": "x = 1\n"}, resources={"classes": ["64Gi"]}),
            "ClassNotAllowed",
        ),
        "no-workflow": (
            release.workflow("no-workflow", {"inline": "x = 1\n"}),
            "InvalidInlineSource",
        ),
    }
    for body, _ in cases.values():
        release.apply(body)
    good = release.workflow("after-bad-ones", {"inline": sleepy("after-bad-ones", 0.1, 2)})
    release.apply(good)
    for name, (_, reason) in cases.items():
        status = release.wait_phase(name)
        assert status["phase"] == "Failed"
        [condition] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
        assert condition["reason"] == reason, condition
        assert ("Warning", reason) in {(k, r) for k, r, _ in release.events(name)}
    assert release.wait_phase("after-bad-ones")["phase"] == "Succeeded"


def test_prewarm_creates_a_pod_before_its_invocation_is_queued(release: Release) -> None:
    source = {"inline": LONG_THEN_WIDE}
    release.apply(release.workflow("long-then-wide-learn", source, planner={"name": "wukong"}))
    assert release.wait_phase("long-then-wide-learn")["phase"] == "Succeeded"
    # Idle Pods of the pool would serve the next run warm, and pre-warm then has nothing to do.
    wait_for(lambda: no_live_worker_pods(release), 90, "the pool's idle Pods to exit")
    body = release.workflow(
        "long-then-wide", source, planner={"name": "wukong", "optimizations": ["prewarm"]}
    )
    release.apply(body)
    status = release.wait_phase("long-then-wide")
    assert status["phase"] == "Succeeded", status
    run_id = status["runId"]
    records = [
        WorkerRecord.model_validate_json(raw)
        for raw in release.store.hgetall(hist_run(run_id, "workers")).values()
    ]
    prewarmed = [r for r in records if r.prewarmed]
    assert status["workers"]["prewarmed"] >= 1 and prewarmed, records
    for record in prewarmed:
        assert record.spawned_at is not None and record.queued_at is not None
        assert record.spawned_at < record.queued_at
    pods = release.seen_pods(run_id)
    ahead = [
        p
        for p in pods
        if any(e["name"] == "DAGKUBE_PREWARM_RUN" for e in p["spec"]["containers"][0]["env"])
    ]
    assert ahead, "no Pod was created for a pre-warm request"


def pod_pids(pod: dict[str, Any]) -> list[int]:
    """The host pids of a Pod's processes (from its cgroup)."""
    root = Path("/sys/fs/cgroup/memory/dagkube-local")
    matches = list(root.glob(f"*/*/pod-{pod['metadata']['uid']}/*/cgroup.procs"))
    pids = [int(p) for path in matches for p in path.read_text().split()]
    assert pids, f"no process found for Pod {pod['metadata']['name']}"
    return pids


def kill_worker_process(kube: Kube, pod: dict[str, Any]) -> None:
    """SIGKILL the worker process of a Pod, as a crash (or the OOM killer) would."""
    for pid in pod_pids(pod):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def test_a_killed_worker_still_gives_the_right_result(release: Release) -> None:
    body = release.workflow(
        "survives-a-kill",
        {"inline": sleepy("survives-a-kill", 3.0, 3)},
        planner={"name": "wukong"},
        resources={"classes": ["512Mi"]},
    )
    release.apply(body)
    run_id = release.wait_phase("survives-a-kill", ("Running",), 60)["runId"]

    def busy() -> dict[str, Any] | None:  # a worker holding an invocation (in its task)
        serving = release.serving_pods(run_id)
        return serving[0] if serving else None

    victim = wait_for(busy, 60, "a worker Pod busy with a task")
    kill_worker_process(release.kube, victim)
    status = release.wait_phase("survives-a-kill")
    assert status["phase"] == "Succeeded", status
    assert release.output_of(run_id, "total#0") == 0 + 1 + 4
    lost = release.store.hget(hist_run(run_id, "meta"), "workers_lost")
    assert int(float(lost or 0)) >= 1


def test_a_worker_pod_killed_for_memory_reruns_its_task_one_class_up(release: Release) -> None:
    body = release.workflow(
        "oom-escalates",
        {"inline": HOG.format(mib=400, name="oom-escalates")},
        planner={"name": "wukong"},  # the middle class: 256Mi here
        resources={"classes": ["256Mi", "1Gi"]},
    )
    release.apply(body)
    status = release.wait_phase("oom-escalates")
    assert status["phase"] == "Succeeded", status
    run_id = status["runId"]
    assert release.output_of(run_id, "after#0") == 401
    meta = release.store.hgetall(hist_run(run_id, "meta"))
    assert (int(meta[b"oom_kills"]), int(meta[b"escalations"])) == (1, 1)
    assert meta[b"enforced"] == b"1"
    tasks = release.store.hvals(hist_run(run_id, "tasks"))
    [hogged] = [r for r in map(TaskRecord.model_validate_json, tasks) if r.task_id == "hog#0"]
    assert hogged.memory_mib == 1024
    assert [a.memory_mib for a in hogged.oom_attempts] == [256]
    assert (hogged.peak_memory_bytes or 0) > 400 * 2**20
    workers = release.store.hvals(hist_run(run_id, "workers"))
    [lost] = [w for w in map(WorkerRecord.model_validate_json, workers) if w.outcome == "lost"]
    assert lost.oom_killed and lost.memory_mib == 256 and lost.lost_task == "hog#0"


def test_deleting_a_running_workflow_collects_its_pods_and_keys(release: Release) -> None:
    release.apply(release.workflow("deleted-midway", {"inline": sleepy("deleted-midway", 60.0, 2)}))
    run_id = release.wait_phase("deleted-midway", ("Running",), 60)["runId"]
    wait_for(
        lambda: (
            len([p for p in release.serving_pods(run_id) if p["status"].get("phase") == "Running"])
            >= 2
        ),
        60,
        "both worker Pods to run its tasks",
    )
    release.kube.kubectl(
        "delete", "workflow", "deleted-midway", "-n", release.namespace, "--wait=false"
    )
    wait_for(
        lambda: (
            release.kube.get("workflow", "deleted-midway", release.namespace) is None
            and not release.run_pods(run_id)
        ),
        60,
        "the Workflow and its Pods to go",
    )
    assert not release.store.exists(RunKeys(run_id).meta, RunKeys(run_id).plan, RunKeys(run_id).dag)
    assert release.store.hget(hist_run(run_id, "meta"), "status") == b"cancelled"


def test_an_operator_restart_mid_run_completes_without_extra_pods(release: Release) -> None:
    body = release.workflow(
        "outlives-the-operator",
        {"inline": sleepy("outlives-the-operator", 4.0, 3)},
        planner={"name": "uniform"},
        resources={"classes": ["512Mi"]},
    )
    release.apply(body)
    run_id = release.wait_phase("outlives-the-operator", ("Running",), 60)["runId"]
    wait_for(lambda: release.serving_pods(run_id), 60, "the run's first Pods")
    first = release.operator_pod()
    assert first is not None
    killed_at = time.time()
    release.kube.kubectl(
        "delete",
        "pod",
        first["metadata"]["name"],
        "-n",
        release.namespace,
        "--grace-period=0",
        "--force",
    )
    wait_for(
        lambda: (
            (p := release.operator_pod()) is not None
            and p["metadata"]["uid"] != first["metadata"]["uid"]
        ),
        120,
        "the Deployment to bring the operator back",
    )
    status = release.wait_phase("outlives-the-operator")
    assert status["phase"] == "Succeeded", status
    assert release.output_of(run_id, "total#0") == 0 + 1 + 4
    from dagkube.planning.model import Plan

    plan = Plan.model_validate_json(release.store.get(hist_run(run_id, "plan")))
    logical = {t.worker_id for t in plan.tasks.values()}
    seen = release.seen_pods(run_id)
    assert len(seen) <= len(logical), (
        f"killed operator Pod {first['metadata']['name']} at {killed_at:.3f}; "
        f"the run's worker Pods:\n{release.describe_pods(seen)}"
    )
    started = [r for _, r, _ in release.events("outlives-the-operator") if r == "Started"]
    assert len(started) == 1


def test_ttl_after_finished_deletes_the_workflow_its_pods_and_keys(release: Release) -> None:
    body = release.workflow(
        "short-lived",
        {"inline": sleepy("short-lived", 0.1, 3)},
        ttlSecondsAfterFinished=2,
        resources={"maxWorkers": 1},
    )
    release.apply(body)
    # Its run id from its uid: it may end and be deleted (2 s later) between two polls of its
    # phase on a loaded machine.
    applied = release.kube.get("workflow", "short-lived", release.namespace)
    assert applied is not None
    run_id = run_id_for(release.namespace, "short-lived", applied["metadata"]["uid"])
    wait_for(
        lambda: (
            release.kube.get("workflow", "short-lived", release.namespace) is None
            and not release.run_pods(run_id)
        ),
        120,
        "the Workflow to end and be deleted after its TTL",
    )
    assert not release.store.exists(RunKeys(run_id).meta, RunKeys(run_id).outputs)
    assert release.store.hget(hist_run(run_id, "meta"), "status") == b"succeeded"


@pytest.mark.parametrize(
    ("name", "resources", "state"),
    [
        ("slow-task", {"classes": ["512Mi"]}, "a task runs"),
        ("never-scheduled", {"classes": ["16Gi"]}, "its Pods are Pending"),
    ],
)
def test_timeout_ends_the_run_whatever_state_it_is_in(
    release: Release, name: str, resources: dict, state: str
) -> None:
    body = release.workflow(
        name, {"inline": sleepy(name, 120.0, 1)}, timeoutSeconds=5, retries=0, resources=resources
    )
    release.apply(body)
    began = time.monotonic()
    status = release.wait_phase(name, timeout_s=90)
    took = time.monotonic() - began
    assert status["phase"] == "Failed", (state, status)
    assert "timed out after 5s (spec.timeoutSeconds)" in status["message"]
    [condition] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
    assert condition["reason"] == "Cancelled"
    assert took < 60, f"a 5 s timeout ended the run after {took:.0f}s ({state})"
    assert release.store.hget(hist_run(status["runId"], "meta"), "status") == b"cancelled"
    wait_for(lambda: not release.run_pods(status["runId"]), 60, "the timed-out run's Pods to go")


def test_the_timeout_fires_while_the_status_cannot_be_written(release: Release) -> None:
    """Writing progress into .status fails (here the Role loses workflows/status): the run is
    still cancelled at its deadline and its Pods released; the Workflow shows it once it can."""
    timeout_while_unwritable(release, "unwritable")


def timeout_while_unwritable(release: Release, name: str) -> None:
    release.apply(
        release.workflow(
            name, {"inline": sleepy(name, 120.0, 1)}, timeoutSeconds=8, retries=0,
            resources={"classes": ["512Mi"]},
        )
    )  # fmt: skip
    run_id = release.wait_phase(name, ("Running",), 60)["runId"]
    role = release.kube.get("role", RELEASE, release.namespace)
    broken = json.loads(json.dumps(role))
    for rule in broken["rules"]:
        rule["resources"] = [r for r in rule["resources"] if r != "workflows/status"]
    broken["rules"] = [rule for rule in broken["rules"] if rule["resources"]]
    for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
        broken["metadata"].pop(key, None)
    release.kube.kubectl("replace", "-f", "-", input=json.dumps(broken))
    try:
        # The worker takes the task, so the progress changes and its patch is refused.
        began = time.monotonic()
        wait_for(
            lambda: release.store.hget(hist_run(run_id, "meta"), "status") == b"cancelled",
            60,
            "the run to be cancelled at its deadline although .status cannot be written",
        )
        ended_after = time.monotonic() - began
        wait_for(lambda: not release.run_pods(run_id), 60, "the run's Pods to be released")
        assert release.status(name)["phase"] == "Running"  # nothing could be written
    finally:
        restored = json.loads(json.dumps(role))
        for key in ("resourceVersion", "uid", "creationTimestamp", "managedFields"):
            restored["metadata"].pop(key, None)
        release.kube.kubectl("replace", "-f", "-", input=json.dumps(restored))
    status = release.wait_phase(name, timeout_s=60)
    assert status["phase"] == "Failed"
    assert "timed out after 8s (spec.timeoutSeconds)" in status["message"]
    assert ended_after < 45, f"the run ended {ended_after:.0f}s after the Role was cut"


def test_a_worker_pod_that_cannot_be_placed_is_reported_then_fails_the_run(
    release: Release,
) -> None:
    """A class larger than any node: the scheduler's reason shows in the status and as an
    Event within seconds, and after the pending timeout the run fails with it."""
    body = release.workflow(
        "too-big", {"inline": sleepy("too-big", 0.1, 1)}, resources={"classes": ["16Gi"]}
    )
    release.apply(body)
    began = time.monotonic()

    def pending() -> dict[str, Any] | None:
        conditions = {c["type"]: c for c in release.status("too-big").get("conditions") or []}
        condition = conditions.get("WorkersPending")
        return condition if condition and condition["status"] == "True" else None

    condition = wait_for(pending, 30, "the WorkersPending condition")
    reported_after = time.monotonic() - began
    assert condition["reason"] == "Unschedulable"
    assert "Insufficient memory" in condition["message"], condition
    assert any(
        kind == "Warning" and reason == "Unschedulable" and "Insufficient memory" in message
        for kind, reason, message in release.events("too-big")
    )
    status = release.wait_phase("too-big", timeout_s=PENDING_TIMEOUT_S + 60)
    assert status["phase"] == "Failed"
    [failed] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
    assert failed["reason"] == "Unschedulable"
    assert f"stayed Pending for more than {PENDING_TIMEOUT_S}s" in status["message"]
    assert reported_after < 20, f"reported {reported_after:.1f}s after the Workflow was applied"
    wait_for(lambda: not release.run_pods(status["runId"]), 60, "the Pending Pods to go")


def test_submit_from_python_and_the_cli(release: Release) -> None:
    import dagkube
    from tests.tasks import add

    redis_url = (
        f"redis://:{release.store.connection_pool.connection_kwargs['password']}@"
        f"{release.store.connection_pool.connection_kwargs['host']}:6379/0"
    )
    env = {**os.environ, "KUBECONFIG": str(release.kube.kubeconfig), "DAGKUBE_REDIS_URL": redis_url}
    os.environ["KUBECONFIG"] = str(release.kube.kubeconfig)
    try:
        wf = dagkube.Workflow(add(add(1, 2), add(3, 4)), name="submitted-sum")
        handle = wf.submit(release.namespace, redis_url=redis_url, image=f"{WORKER_IMAGE}:dev")
        assert handle.wait(RUN_TIMEOUT_S) == 10
    finally:
        os.environ.pop("KUBECONFIG", None)
    done = subprocess.run(
        [sys.executable, "-m", "dagkube.cli", "submit", "tests/data/failing_workflow.py",
         "-n", release.namespace, "--wait", "--wait-timeout", str(int(RUN_TIMEOUT_S))],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S + 30,
    )  # fmt: skip
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert "KeyError" in done.stderr and "parse#0" in done.stderr, done.stderr
    manifest = subprocess.run(
        [sys.executable, "-m", "dagkube.cli", "manifest", "examples/tree_reduction.py",
         "--planner", "uniform"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert manifest.returncode == 0, manifest.stderr
    applied = release.kube.kubectl(
        "apply", "-n", release.namespace, "-f", "-", input=manifest.stdout
    )
    name = applied.stdout.split("workflow.dagkube.io/")[1].split()[0]
    assert release.wait_phase(name)["phase"] == "Succeeded"


def test_the_operator_made_only_calls_its_role_grants(release: Release) -> None:
    """The API server's audit log: every request of the operator's ServiceAccount was allowed
    (no 403) and is granted by the chart's Role."""
    role = release.kube.get("role", f"{RELEASE}-operator", release.namespace) or release.kube.get(
        "role", RELEASE, release.namespace
    )
    assert role is not None
    granted = {
        (verb, group, resource)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    user = f"system:serviceaccount:{release.namespace}:{RELEASE}"
    log = release.kube.state.config.path("logs", "audit.log")
    used: set[tuple[str, str, str]] = set()
    denied = []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        # (requests that failed authentication are logged without a username)
        if event["user"].get("username") != user or "objectRef" not in event:
            continue
        ref = event["objectRef"]
        resource = ref["resource"] + (f"/{ref['subresource']}" if ref.get("subresource") else "")
        call = (event["verb"], ref.get("apiGroup", ""), resource)
        used.add(call)
        # (The Role lost workflows/status on purpose while "unwritable..." ran.)
        if (event.get("responseStatus") or {}).get("code") == 403 and ref.get(
            "name"
        ) != "unwritable":
            denied.append(call)
    assert ("create", "", "pods") in used and ("patch", "dagkube.io", "workflows/status") in used
    assert not denied, f"the API server refused: {sorted(set(denied))}"
    assert used - granted == set(), f"calls the Role does not grant: {sorted(used - granted)}"


# Inline sources that count their builds in Redis (a build Pod has its namespace's worker
# credential: the counter is a key of that namespace), so a test sees whether the operator
# ran one again.
COUNTED = """
import os
import redis

redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"]).lpush("{counter}", "built")
{then}
"""

MEGA_ERROR = """
import dagkube


@dagkube.task
def explode() -> int:
    raise ValueError("boom " + "x" * (3 * 1024 * 1024))


def build() -> dagkube.Workflow:
    return dagkube.Workflow(explode(), name="mega-error")
"""


def succeeded_condition(status: dict[str, Any]) -> dict[str, Any]:
    [condition] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
    return condition


def test_unexpected_errors_end_the_workflow_failed_once(release: Release) -> None:
    """A build that exits without a DAG, a ref to a Redis key of another type and a run whose
    state vanished from Redis each end their Workflow Failed, with a reason and an Event, once:
    the operator does not run the build again."""
    store = release.store
    store.hset("dk:dag:0123456789abcdef", "field", "value")  # a hash where a DAG would be
    counter = f"dk:ns:{release.namespace}:test:builds"
    exits = COUNTED.format(counter=counter, then="os._exit(0)")
    release.apply(release.workflow("exits-in-build", {"inline": exits}))
    release.apply(release.workflow("ref-to-a-hash", {"ref": {"dag": "0123456789abcdef"}}))
    release.apply(release.workflow("state-lost", {"inline": sleepy("state-lost", 60.0, 1)}))
    run_id = release.wait_phase("state-lost", ("Running",), 60)["runId"]
    wait_for(lambda: release.serving_pods(run_id), 60, "the run's first Pod")
    store.delete(*store.scan_iter(f"{RunKeys(run_id).prefix}:*"), hist_run(run_id, "meta"))

    exited = release.wait_phase("exits-in-build", timeout_s=60)
    assert exited["phase"] == "Failed", exited
    assert succeeded_condition(exited)["reason"] == "BuildFailed"
    assert "exited with status 0 without writing its outcome" in exited["message"], exited
    assert ("Warning", "BuildFailed") in {(k, r) for k, r, _ in release.events("exits-in-build")}

    ref = release.wait_phase("ref-to-a-hash", timeout_s=60)
    assert ref["phase"] == "Failed", ref
    assert succeeded_condition(ref)["reason"] == "DagNotFound"
    assert (
        "Redis key 'dk:dag:0123456789abcdef': holds a hash, not a DAG description"
        in (ref["message"])
    )
    assert ("Warning", "DagNotFound") in {(k, r) for k, r, _ in release.events("ref-to-a-hash")}

    gone = release.wait_phase("state-lost", timeout_s=30)
    assert gone["phase"] == "Failed", gone
    assert succeeded_condition(gone)["reason"] == "RunStateLost"
    assert f"run {run_id}: its state is gone from Redis" in gone["message"]
    assert ("Warning", "RunStateLost") in {(k, r) for k, r, _ in release.events("state-lost")}
    wait_for(lambda: not release.run_pods(run_id), 60, "the lost run's Pods to be released")

    # kopf retried a failed daemon every 5 s, building again each time: wait past that.
    time.sleep(6)
    assert store.llen(counter) == 1
    for name in ("exits-in-build", "ref-to-a-hash", "state-lost"):
        assert release.status(name)["phase"] == "Failed"
        warnings = [r for k, r, _ in release.events(name) if k == "Warning"]
        assert len(warnings) == 1, (name, warnings)


def test_a_task_error_of_megabytes_is_truncated_and_the_pods_released(release: Release) -> None:
    release.apply(release.workflow("mega-error", {"inline": MEGA_ERROR}, retries=0))
    status = release.wait_phase("mega-error", timeout_s=120)
    assert status["phase"] == "Failed", status
    message = status["message"]
    assert len(message.encode()) <= 4096 and "boom xxx" in message, message[:200]
    assert "(truncated, " in message and "full text in Redis key " in message, message[-300:]
    assert len(succeeded_condition(status)["message"].encode()) <= 4096
    key = message.split("full text in Redis key ")[1].split(")")[0]
    kept = release.store.get(key)
    assert kept is not None and len(kept) > 4096 and kept.startswith(message[:100].encode())
    events = [(k, r, m) for k, r, m in release.events("mega-error") if r == "Failed"]
    assert events and all(k == "Warning" and len(m) <= 1024 for k, _, m in events), events
    wait_for(lambda: not release.run_pods(status["runId"]), 60, "the failed run's Pods to go")


def test_a_build_writing_600_mib_to_stderr_costs_the_operator_little_memory(
    release: Release,
) -> None:
    """The build runs in a Pod: its log is the node's to keep, and the operator reads only its
    last lines, bounded, for the message."""
    operator = release.operator_pod()
    assert operator is not None
    flood = (
        "import sys\nchunk = b'e' * 1023 + b'\\n'\nfor _ in range(600 * 1024):\n"
        "    sys.stderr.buffer.write(chunk)\nsys.stderr.buffer.write(b'the last words')\n"
        "sys.stderr.flush()\nos._exit(1)"
    )
    counter = f"dk:ns:{release.namespace}:test:floods"
    release.apply(
        release.workflow("stderr-flood", {"inline": COUNTED.format(counter=counter, then=flood)})
    )
    status = release.wait_phase("stderr-flood", timeout_s=120)
    assert status["phase"] == "Failed", status
    assert succeeded_condition(status)["reason"] == "BuildFailed"
    assert "exit code 1" in status["message"] and "the last words" in status["message"]
    assert len(status["message"].encode()) <= 4096 and "(truncated, " in status["message"]
    assert release.store.llen(counter) == 1
    after = release.operator_pod()
    assert after is not None and after["metadata"]["uid"] == operator["metadata"]["uid"]
    assert (
        after["status"]["containerStatuses"][0]["restartCount"]
        == (operator["status"]["containerStatuses"][0]["restartCount"])
    )
    peaks = []
    for pid in pod_pids(after):
        fields = dict(
            line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
        )
        peaks.append(int(fields["VmHWM"].split()[0]) // 1024)
    assert max(peaks) < 300, f"the operator's peak RSS is {max(peaks)} MiB"


def test_a_build_leaving_a_process_behind_ends_at_its_timeout(release: Release) -> None:
    """A build that never returns and starts a process of its own: at the timeout its Pod is
    deleted, and every process of it goes."""
    marker = f"dagkube-grandchild-{release.namespace}"
    source = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)  # {marker}'])\n"
        "time.sleep(600)\n"
    )
    began = time.monotonic()
    release.apply(release.workflow("holds-stderr", {"inline": source}))
    status = release.wait_phase("holds-stderr", timeout_s=BUILD_TIMEOUT_S + 60)
    took = time.monotonic() - began
    assert status["phase"] == "Failed", status
    assert succeeded_condition(status)["reason"] == "BuildTimeout"
    assert f"took longer than {BUILD_TIMEOUT_S}s" in status["message"]
    assert took < BUILD_TIMEOUT_S + 10, f"a {BUILD_TIMEOUT_S}s build timeout took {took:.0f}s"
    assert ("Warning", "BuildTimeout") in {(k, r) for k, r, _ in release.events("holds-stderr")}
    import psutil

    def left_behind() -> list[int]:
        return [
            p.pid
            for p in psutil.process_iter(["cmdline"])
            if any(marker in part for part in p.info["cmdline"] or [])
        ]

    wait_for(lambda: not left_behind(), 15, "the build's grandchild to be killed")
    wait_for(lambda: not release.build_pods(), 30, "the build Pod to be deleted")


def test_worker_pods_get_a_redis_user_of_their_namespace_only(release: Release) -> None:
    """The run's keys live under its namespace's prefix; its worker Pods read the URL of the
    namespace's own Redis user (made by the operator, in a Secret of the namespace), which
    runs the workflow but is refused anything else."""
    import base64
    import urllib.parse

    import redis

    release.apply(release.workflow("own-credentials", {"inline": sleepy("own", 0.1, 2)}))
    status = release.wait_phase("own-credentials")
    assert status["phase"] == "Succeeded", status
    run_id = status["runId"]
    assert run_id.startswith(f"{release.namespace}.")
    assert RunKeys(run_id).prefix == f"dk:ns:{release.namespace}:run:{run_id}"
    pods = release.seen_pods(run_id)
    assert pods
    for pod in pods:
        [container] = pod["spec"]["containers"]
        env = {e["name"]: e for e in container["env"]}
        ref = env["DAGKUBE_REDIS_URL"]["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "dagkube-worker-redis", "key": "url"}, ref
    secret = release.kube.get("secret", "dagkube-worker-redis", release.namespace)
    assert secret is not None
    url = urllib.parse.urlsplit(base64.b64decode(secret["data"]["url"]).decode())
    assert url.username == f"dagkube-worker-{release.namespace}"
    admin = release.store.connection_pool.connection_kwargs
    worker = redis.Redis(
        host=admin["host"], port=admin["port"], username=url.username,
        password=urllib.parse.unquote(url.password or ""), socket_timeout=10,
    )  # fmt: skip
    try:
        assert worker.hget(RunKeys(run_id).meta, "status") == b"succeeded"
        release.store.set("dk:ns:another-team:run:another-team.x:meta", "theirs")
        for command in (
            ("CONFIG", "GET", "maxmemory"),
            ("FLUSHALL",),
            ("KEYS", "*"),
            ("GET", "dk:ns:another-team:run:another-team.x:meta"),
            ("GET", "dk:dag:0123456789abcdef"),
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                worker.execute_command(*command)
    finally:
        worker.close()
    assert release.store.get("dk:ns:another-team:run:another-team.x:meta") == b"theirs"


# Hostile inline sources (issue 17): each tries one thing at build time, in the build Pod, and
# records what happened, with the host it ran on, under its namespace's keys (the only ones
# its credential reaches); then it defines a workflow, so a Workflow that gets nothing it
# tried still succeeds.
PROBE = """
import json, os, socket, sys
import dagkube, redis
from urllib.parse import urlsplit

client = redis.Redis.from_url(os.environ["DAGKUBE_REDIS_URL"])


def record(value):
    found = {{"host": socket.gethostname(), "value": value}}
    client.set("dk:ns:{namespace}:probe:{what}", json.dumps(found))


{attempt}


@dagkube.task
def one() -> int:
    return 1


workflow = dagkube.Workflow(one(), name="{what}")
"""

ATTEMPTS = {
    "token": """
try:
    with open("/var/run/secrets/kubernetes.io/serviceaccount/token") as handle:
        record("read " + str(len(handle.read())) + " characters")
except OSError as exc:
    record(type(exc).__name__)
""",
    "password": """
record({{
    "password": os.environ.get("DAGKUBE_REDIS_PASSWORD"),
    "user": urlsplit(os.environ["DAGKUBE_REDIS_URL"]).username,
}})
""",
    "pod": """
import ssl, urllib.error, urllib.request
pod = {{"apiVersion": "v1", "kind": "Pod", "metadata": {{"name": "pwned"}},
       "spec": {{"containers": [{{"name": "x", "image": "busybox", "command": ["sleep", "60"]}}]}}}}
address = os.environ["KUBERNETES_SERVICE_HOST"] + ":" + os.environ["KUBERNETES_SERVICE_PORT"]
request = urllib.request.Request(
    f"https://{{address}}/api/v1/namespaces/{namespace}/pods", data=json.dumps(pod).encode(),
    method="POST", headers={{"Content-Type": "application/json"}},
)
try:
    with urllib.request.urlopen(request, context=ssl._create_unverified_context(), timeout=10):
        record("created")
except urllib.error.HTTPError as exc:
    record(exc.code)
""",
    "pickle": """
import atexit


class Payload:
    # unpickled with the operator's environment, it would set dk:pwned
    def __reduce__(self):
        code = (
            "import os, redis; redis.Redis.from_url(os.environ['DAGKUBE_REDIS_URL'], "
            "password=os.environ.get('DAGKUBE_REDIS_PASSWORD') or None).set('dk:pwned', '1')"
        )
        return (exec, (code,))


import pickle
payload = pickle.dumps(Payload())
key = sys.argv[sys.argv.index("--key") + 1]
refused = []
for target in ("dk:dag:0123456789abcdef0123456789abcdef", "dk:pwned-target"):
    try:
        client.set(target, payload)
    except redis.exceptions.NoPermissionError:
        refused.append(target)
record({{"key": key, "refused": refused}})
# once the build stored its DAG, put the payload where the operator reads the description
atexit.register(lambda: client.set(key, payload))
""",
}


def test_hostile_inline_sources_get_nothing_of_the_operators_power(release: Release) -> None:
    """Issue 17's acceptance: an inline source that tries to read the ServiceAccount token,
    the Redis password, to create a Pod or to plant a pickle ends Failed or succeeds without
    any of it working, and none of it ran in the operator's process (the host it ran on is
    the Workflow's build Pod)."""
    store = release.store
    store.delete("dk:pwned")
    ns = release.namespace
    for what, attempt in ATTEMPTS.items():
        source = PROBE.format(namespace=ns, what=what, attempt=attempt.format(namespace=ns))
        release.apply(release.workflow(f"hostile-{what}", {"inline": source}, retries=0))
    ended = {what: release.wait_phase(f"hostile-{what}", timeout_s=120) for what in ATTEMPTS}
    operator = release.operator_pod()
    assert operator is not None
    found = {}
    for what, status in ended.items():
        raw = store.get(f"dk:ns:{ns}:probe:{what}")
        assert raw is not None, f"the {what} probe never ran: {status}"
        found[what] = json.loads(raw)
        workflow = release.kube.get("workflow", f"hostile-{what}", ns)
        assert workflow is not None
        build_pod = f"dk-{workflow['metadata']['uid'].replace('-', '')[:8]}-build"
        assert found[what]["host"] == build_pod, (what, found[what], operator["metadata"]["name"])
    assert found["token"]["value"] == "FileNotFoundError"
    assert found["password"]["value"]["password"] is None
    assert found["password"]["value"]["user"] == f"dagkube-worker-{ns}"
    assert found["pod"]["value"] in (401, 403), found["pod"]
    assert release.kube.get("pod", "pwned", ns) is None
    assert sorted(found["pickle"]["value"]["refused"]) == [
        "dk:dag:0123456789abcdef0123456789abcdef",
        "dk:pwned-target",
    ]
    for what in ("token", "password", "pod"):
        assert ended[what]["phase"] == "Succeeded", ended[what]
    planted = ended["pickle"]
    assert planted["phase"] == "Failed", planted
    assert succeeded_condition(planted)["reason"] == "BuildFailed"
    assert "not a dagkube DAG description" in planted["message"], planted["message"]
    assert store.get("dk:pwned") is None
    wait_for(lambda: not release.build_pods(), 30, "the build Pods to be deleted")
