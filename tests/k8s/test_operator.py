"""The real operator (``python -m dagkube_operator``, kopf) against the emulated API server.

One emulator, one test kubelet and one operator process serve the module's tests (they use
distinct Workflow names); real Redis, real worker processes. A Workflow goes in, Pods with the
right resources appear and run, the run completes with correct outputs and ``.status`` and
Events show it. The last test compares the chart's RBAC Role with every API call the operator
made in the module.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis
import redis.asyncio
import yaml

from dagkube.kubernetes.pods import LABEL_CLASS, LABEL_RUN
from dagkube.metrics.records import WorkerRecord
from dagkube.resources import cpu_millicores, parse_memory
from dagkube.runtime.embedded import _free_port
from dagkube.runtime.keys import RunKeys, hist_run
from tests.k8s.kmock_env import (
    EmulatedCluster,
    kubernetes_api,
    validate_workflow,
    wait_for,
)
from tests.k8s.kubelet import TestKubelet
from tests.k8s.test_chart import only, rendered, tools  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.k8s,
    pytest.mark.integration,
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.filterwarnings("ignore:read_binary is deprecated:DeprecationWarning"),
    pytest.mark.timeout(240),
]

ROOT = Path(__file__).resolve().parents[2]
NAMESPACE = "jobs"
SECRET = "dagkube-redis"
IMAGE = "dagkube-worker:test"
RUN_TIMEOUT_S = 120.0


def manifest(path: str) -> dict[str, Any]:
    body = yaml.safe_load((ROOT / path).read_text())
    body["metadata"]["namespace"] = NAMESPACE
    return body


def workflow(name: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "dagkube.io/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"source": source, **spec},
    }


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


def sleepy(name: str, seconds: float, width: int) -> str:
    return SLEEPY.format(seconds=seconds, width=width, name=name)


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


class Harness:
    """The emulated cluster, the kubelet, the operator process and a record of every Pod."""

    def __init__(
        self, cluster: EmulatedCluster, kubelet: TestKubelet, redis_url: str, workdir: Path
    ):
        self.cluster = cluster
        self.kubelet = kubelet
        self.redis_url = redis_url
        self.workdir = workdir
        self.metrics_port = _free_port()
        self.process: asyncio.subprocess.Process | None = None
        self.pods: dict[str, dict[str, Any]] = {}  # every Pod seen, as first seen
        self.first_seen: dict[str, float] = {}
        self.operators_started = 0

    def env(self, **overrides: str) -> dict[str, str]:
        return {
            **os.environ,
            "DAGKUBE_REDIS_URL": self.redis_url,
            "DAGKUBE_REDIS_URL_SECRET": SECRET,
            "DAGKUBE_REDIS_URL_SECRET_KEY": "redis-url",
            "DAGKUBE_KUBE_API_URL": self.cluster.url,
            "DAGKUBE_WATCH_NAMESPACE": NAMESPACE,
            "DAGKUBE_WORKER_IMAGE": IMAGE,
            "DAGKUBE_METRICS_PORT": str(self.metrics_port),
            "DAGKUBE_IDLE_TIMEOUT": "5",
            "DAGKUBE_MAX_WORKERS": "8",
            **overrides,
        }

    async def start_operator(self, **overrides: str) -> None:
        self.operators_started += 1
        log = open(self.workdir / f"operator-{self.operators_started}.log", "wb")  # noqa: SIM115
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "dagkube_operator",
            cwd=ROOT,
            env=self.env(**overrides),
            stdout=log,
            stderr=log,
        )
        log.close()
        await wait_for(self._healthy, 30, "the operator's /healthz to answer 200")

    async def _healthy(self) -> bool:
        with contextlib.suppress(Exception):
            url = f"http://127.0.0.1:{self.metrics_port}/healthz"
            async with self.cluster.http.get(url) as response:
                return response.status == 200
        return False

    async def stop_operator(self, kill: bool = False) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            await asyncio.wait_for(self.process.wait(), 30)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    def operator_log(self) -> str:
        return "\n".join(
            path.read_text(errors="replace")[-6000:]
            for path in sorted(self.workdir.glob("operator-*.log"))
        )

    async def record_pods(self) -> None:
        while True:
            for name, pod in (await self.cluster.pods(NAMESPACE)).items():
                if name not in self.pods:
                    self.pods[name] = pod
                    self.first_seen[name] = time.time()
            await asyncio.sleep(0.05)

    async def create(self, body: dict[str, Any], *, validate: bool = True) -> None:
        if validate:
            validate_workflow(body)
        await self.cluster.create_workflow(body)

    async def wait_phase(
        self,
        name: str,
        phases: tuple[str, ...] = ("Succeeded", "Failed"),
        timeout_s: float = RUN_TIMEOUT_S,
    ) -> dict[str, Any]:
        async def reached() -> dict[str, Any] | None:
            found = await self.cluster.workflow(NAMESPACE, name)
            status = (found or {}).get("status") or {}
            return status if status.get("phase") in phases else None

        try:
            return await wait_for(reached, timeout_s, f"Workflow {name} to reach {phases}")
        except AssertionError:
            found = await self.cluster.workflow(NAMESPACE, name)
            raise AssertionError(
                f"Workflow {name}: {found and found.get('status')}\n--- operator log:\n"
                f"{self.operator_log()}"
            ) from None

    async def events(self, name: str) -> list[tuple[str, str, str]]:
        return [
            (event.get("type", ""), event.get("reason", ""), event.get("message", ""))
            for event in await self.cluster.events(NAMESPACE)
            if (event.get("involvedObject") or {}).get("name") == name
        ]

    def run_pods(self, run_id: str) -> dict[str, dict[str, Any]]:
        return {n: p for n, p in self.pods.items() if p["metadata"]["labels"][LABEL_RUN] == run_id}

    async def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        async with self.cluster.http.get(url) as response:
            return await response.text()


DB = 6  # a database of its own: plans here start from no history, whatever ran before


@pytest.fixture(scope="module")
def redis_url(redis_server) -> str:
    url = redis_server.url.rsplit("/", 1)[0] + f"/{DB}"
    with redis.Redis.from_url(url) as client:
        client.flushdb()
    return url


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def harness(redis_url, tmp_path_factory) -> AsyncIterator[Harness]:
    workdir = tmp_path_factory.mktemp("operator")
    async with kubernetes_api() as cluster:
        await cluster.create_namespace(NAMESPACE)
        await cluster.create_secret(NAMESPACE, SECRET, {"redis-url": redis_url})
        async with TestKubelet(cluster, NAMESPACE, workdir / "kubelet") as kubelet:
            found = Harness(cluster, kubelet, redis_url, workdir)
            recorder = asyncio.create_task(found.record_pods())
            await found.start_operator()
            try:
                yield found
            finally:
                await found.stop_operator()
                recorder.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await recorder
                # Idle workers of finished runs are removed by the operator; anything left
                # (e.g. after a failed test) goes with the kubelet.
                for name in list(await cluster.pods(NAMESPACE)):
                    with contextlib.suppress(Exception):
                        await cluster.delete_pod(NAMESPACE, name)


@pytest_asyncio.fixture(loop_scope="module")
async def store(redis_url) -> AsyncIterator[Any]:
    client = redis.asyncio.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def output_of(store: Any, run_id: str, task_id: str) -> Any:
    """A task's stored output (the run's outputs stay in Redis for the run's TTL)."""
    blob = await store.hget(RunKeys(run_id).outputs, task_id)
    assert blob is not None, f"run {run_id} has no stored output of {task_id}"
    return pickle.loads(blob)


async def dump_run(store: Any, run_id: str | None, harness: Harness) -> None:
    """What a failed run left in Redis, written next to the logs (for the failure report)."""
    import json

    if not run_id:
        return
    from dagkube.runtime.keys import hist_run as hist

    report = {
        "meta": {
            k.decode(): v.decode() for k, v in (await store.hgetall(hist(run_id, "meta"))).items()
        },
        "workers": [v.decode() for v in (await store.hgetall(hist(run_id, "workers"))).values()],
        "tasks": sorted(k.decode() for k in await store.hkeys(hist(run_id, "tasks"))),
        "plan": json.loads(await store.get(hist(run_id, "plan")) or "{}"),
    }
    (harness.workdir / f"run-{run_id}.json").write_text(json.dumps(report, indent=1))


def check_pod(pod: dict[str, Any], memory_per_cpu_mib: int = 1792, max_cpu: float = 6.0) -> int:
    """The Pod's resources follow its class, and it runs locked down; returns the class."""
    memory = parse_memory(pod["metadata"]["labels"][LABEL_CLASS])
    [container] = pod["spec"]["containers"]
    millicores = cpu_millicores(memory, memory_per_cpu_mib, max_cpu)
    expected = {"cpu": f"{millicores}m", "memory": f"{memory}Mi"}
    assert container["resources"] == {"requests": expected, "limits": expected}
    spec = pod["spec"]
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    [redis_env] = [e for e in container["env"] if e["name"] == "DAGKUBE_REDIS_URL"]
    assert redis_env["valueFrom"]["secretKeyRef"] == {"name": SECRET, "key": "redis-url"}
    assert pod["metadata"]["ownerReferences"][0]["kind"] == "Workflow"
    return memory


async def test_module_and_inline_workflows_succeed(harness: Harness, store: Any) -> None:
    tree = manifest("examples/manifests/workflow-module.yaml")
    inline = manifest("examples/manifests/workflow-inline.yaml")
    # The inline one on the 2Gi class with a CPU cap: 2Gi / 1792Mi = 1143m, capped at 500m.
    inline["spec"]["resources"] = {"classes": ["2Gi"], "maxCpu": 0.5}
    branches = workflow(
        "unequal-branches",
        {"module": {"name": "examples.unequal_branches:build"}},
        planner={"name": "non-uniform", "sla": "p90"},
        resources={"classes": ["512Mi", "1Gi", "2Gi"]},
    )
    for body in (tree, inline, branches):
        await harness.create(body)
    statuses = {
        body["metadata"]["name"]: await harness.wait_phase(body["metadata"]["name"])
        for body in (tree, inline, branches)
    }
    for name, status in statuses.items():
        if status["phase"] != "Succeeded":
            await dump_run(store, status.get("runId"), harness)
        assert status["phase"] == "Succeeded", (name, status)
        assert status["runId"] and status["planner"] and status["sla"]
        assert status["tasks"]["done"] == status["tasks"]["total"] > 0
        assert status["tasks"]["failed"] == 0
        assert status["actualMakespanSeconds"] > 0 and status["predictedMakespanSeconds"] > 0
        assert isinstance(status["slaMet"], bool)
        assert status["workers"]["cold"] + status["workers"]["warm"] >= 1
        assert status["resources"]["gbSeconds"] > 0
        assert status["startTime"] and status["completionTime"]
        conditions = {c["type"]: c for c in status["conditions"]}
        assert conditions["Succeeded"]["status"] == "True"
        assert conditions["Planned"]["status"] == "True"
        events = await harness.events(name)
        assert ("Normal", "Started") in {(kind, reason) for kind, reason, _ in events}, events
        assert ("Normal", "Succeeded") in {(kind, reason) for kind, reason, _ in events}, events

    import examples.tree_reduction as tree_module
    import examples.unequal_branches as branches_module

    [tree_output] = tree_module.build().dag.output_ids
    tree_module.verify(await output_of(store, statuses["tree-reduction"]["runId"], tree_output))
    assert await output_of(store, statuses["sum-of-squares"]["runId"], "total#0") == 204
    [branches_output] = branches_module.build().dag.output_ids
    branches_module.verify(
        await output_of(store, statuses["unequal-branches"]["runId"], branches_output)
    )

    # Pods: memory request = limit = class, CPU = class / 1792Mi in millicores, capped.
    for name, status in statuses.items():
        pods = harness.run_pods(status["runId"])
        assert pods, f"no Pods seen for {name}"
        cap = 0.5 if name == "sum-of-squares" else 6.0
        classes = {check_pod(pod, max_cpu=cap) for pod in pods.values()}
        if name == "sum-of-squares":
            assert classes == {2048}
            assert {
                p["spec"]["containers"][0]["resources"]["limits"]["cpu"] for p in pods.values()
            } == {"500m"}
        if name == "unequal-branches":
            assert len(classes) > 1, f"non-uniform used one class only: {classes}"
    every_cpu = {
        pod["metadata"]["labels"][LABEL_CLASS]: pod["spec"]["containers"][0]["resources"]["limits"][
            "cpu"
        ]
        for name, status in statuses.items()
        if name != "sum-of-squares"
        for pod in harness.run_pods(status["runId"]).values()
    }
    assert every_cpu["512Mi"] == "286m" and every_cpu["2Gi"] == "1143m", every_cpu

    metrics = await harness.metrics()
    assert 'dagkube_operator_workflows{phase="Succeeded"} 3.0' in metrics
    assert 'dagkube_operator_workflows_finished_total{phase="Succeeded"} 3.0' in metrics
    assert "dagkube_operator_pods_created_total" in metrics


async def test_bad_specs_end_failed_and_the_operator_keeps_serving(harness: Harness) -> None:
    bad_sla = workflow("bad-sla", {"inline": "x = 1\n"}, planner={"sla": "p100"})
    with pytest.raises(AssertionError, match="sla"):
        validate_workflow(bad_sla)  # a real API server rejects it; an outdated CRD may not
    cases = {
        "unknown-module": (
            workflow("unknown-module", {"module": {"name": "nosuch.module:build"}}),
            "ModuleNotFound",
        ),
        "huge-class": (
            workflow("huge-class", {"inline": "x = 1\n"}, resources={"classes": ["64Gi"]}),
            "ClassNotAllowed",
        ),
        "bad-sla": (bad_sla, "InvalidSLA"),
        "no-workflow": (workflow("no-workflow", {"inline": "x = 1\n"}), "InvalidInlineSource"),
    }
    # As with a CRD installed without its schema: the objects, later their status, go in as is.
    harness.cluster.emulator.enforce_schemas = False
    try:
        for body, _ in cases.values():
            await harness.create(body, validate=False)
        good = workflow("after-bad-ones", {"inline": sleepy("after-bad-ones", 0.1, 2)})
        await harness.create(good)
        await check_failures(harness, cases)
    finally:
        harness.cluster.emulator.enforce_schemas = True


async def check_failures(harness: Harness, cases: dict[str, tuple[dict, str]]) -> None:
    for name, (_, reason) in cases.items():
        status = await harness.wait_phase(name)
        assert status["phase"] == "Failed"
        [condition] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
        assert condition["status"] == "False" and condition["reason"] == reason, condition
        assert status["message"] == condition["message"]
        assert ("Warning", reason) in {(k, r) for k, r, _ in await harness.events(name)}
    assert "nosuch.module" in (await harness.wait_phase("unknown-module"))["message"]
    assert (
        "64Gi" in (await harness.wait_phase("huge-class"))["message"]
        or "65536Mi" in (await harness.wait_phase("huge-class"))["message"]
    )
    assert (await harness.wait_phase("after-bad-ones"))["phase"] == "Succeeded"
    assert harness.process is not None and harness.process.returncode is None


async def test_prewarm_creates_a_pod_before_its_invocation_is_queued(
    harness: Harness, store: Any
) -> None:
    # Pods that start slowly, like real ones: the planner sees the fan-out's cold starts.
    await harness.stop_operator()
    await harness.start_operator(DAGKUBE_STARTUP_DELAY="2")
    try:
        # One run without prewarm first: the planner learns how long `prepare` and a cold
        # start take (without history it cannot tell when a pre-warmed Pod would be in time).
        # A long task, then a fan-out of tasks long enough that one warm worker cannot drain
        # the queue before pre-warmed Pods are up, even on a loaded machine.
        source = {"inline": LONG_THEN_WIDE}
        await harness.create(workflow("long-then-wide-learn", source, planner={"name": "wukong"}))
        assert (await harness.wait_phase("long-then-wide-learn"))["phase"] == "Succeeded"
        body = workflow(
            "long-then-wide",
            source,
            planner={"name": "wukong", "optimizations": ["prewarm"]},
        )
        await harness.create(body)
        status = await harness.wait_phase("long-then-wide")
    finally:
        await harness.stop_operator()
        await harness.start_operator()
    assert status["phase"] == "Succeeded", status
    run_id = status["runId"]
    from dagkube.planning.model import Plan

    plan = Plan.model_validate_json(await store.get(hist_run(run_id, "plan")))
    meta = await store.hgetall(hist_run(run_id, "meta"))
    counters = {
        k.decode(): v.decode() for k, v in meta.items() if k.startswith((b"prewarm", b"workers"))
    }
    assert status["workers"]["prewarmed"] >= 1, (plan.notes, plan.optimization_counts(), counters)
    records = [
        WorkerRecord.model_validate_json(raw)
        for raw in (await store.hgetall(hist_run(run_id, "workers"))).values()
    ]
    prewarmed = [r for r in records if r.prewarmed]
    assert prewarmed, records
    for record in prewarmed:
        assert not record.cold  # its start-up was over before the work came: a warm start
        assert record.spawned_at is not None and record.queued_at is not None
        assert record.spawned_at < record.queued_at
    pods = harness.run_pods(run_id)
    ahead = [
        name
        for name, pod in pods.items()
        if any(e["name"] == "DAGKUBE_PREWARM_RUN" for e in pod["spec"]["containers"][0]["env"])
    ]
    assert ahead, "no Pod was created for a pre-warm request"
    first_queue = min(r.queued_at for r in prewarmed)
    assert min(harness.first_seen[name] for name in ahead) < first_queue


async def test_a_killed_worker_pod_still_gives_the_right_result(
    harness: Harness, store: Any
) -> None:
    body = workflow(
        "survives-a-kill",
        {"inline": sleepy("survives-a-kill", 3.0, 3)},
        planner={"name": "wukong"},
        resources={"classes": ["512Mi"]},
    )
    await harness.create(body)
    running = await harness.wait_phase("survives-a-kill", ("Running",), 30)
    run_id = running["runId"]

    async def busy_pod() -> str | None:
        for name in harness.run_pods(run_id):
            started = harness.kubelet.started.get(name)
            if started is not None and time.time() - started > 1.5:
                return name
        return None

    victim = await wait_for(busy_pod, 30, "a worker Pod busy with a task")
    harness.kubelet.kill(victim)
    status = await harness.wait_phase("survives-a-kill")
    assert status["phase"] == "Succeeded", status
    assert await output_of(store, run_id, "total#0") == 0 + 1 + 4
    lost = await store.hget(hist_run(run_id, "meta"), "workers_lost")
    assert int(float(lost or 0)) >= 1


async def test_deleting_a_running_workflow_removes_its_pods_and_keys(
    harness: Harness, store: Any
) -> None:
    body = workflow("deleted-midway", {"inline": sleepy("deleted-midway", 60.0, 2)})
    await harness.create(body)
    run_id = (await harness.wait_phase("deleted-midway", ("Running",), 30))["runId"]
    await wait_for(
        lambda: len([n for n in harness.run_pods(run_id) if n in harness.kubelet.started]) >= 2,
        30,
        "both worker Pods to run",
    )
    names = list(harness.run_pods(run_id))
    await harness.cluster.delete_workflow(NAMESPACE, "deleted-midway")

    async def gone() -> bool:
        workflow_left = await harness.cluster.workflow(NAMESPACE, "deleted-midway")
        pods_left = set(await harness.cluster.pods(NAMESPACE)) & set(names)
        return workflow_left is None and not pods_left

    await wait_for(gone, 30, "the Workflow and its Pods to go")
    for name in names:
        process = harness.kubelet.process(name)
        if process is not None:
            await asyncio.wait_for(process.wait(), 15)  # the worker stopped
    assert not await store.exists(RunKeys(run_id).meta, RunKeys(run_id).plan, RunKeys(run_id).dag)
    assert (await store.hget(hist_run(run_id, "meta"), "status")) == b"cancelled"


async def test_an_operator_restart_mid_run_completes_without_extra_pods(
    harness: Harness, store: Any
) -> None:
    body = workflow(
        "outlives-the-operator",
        {"inline": sleepy("outlives-the-operator", 4.0, 3)},
        planner={"name": "uniform"},
        resources={"classes": ["512Mi"]},
    )
    await harness.create(body)
    run_id = (await harness.wait_phase("outlives-the-operator", ("Running",), 30))["runId"]
    await wait_for(lambda: harness.run_pods(run_id), 30, "the run's first Pods")
    await asyncio.sleep(1.0)
    await harness.stop_operator(kill=True)  # no goodbye: as if its Pod were evicted
    await harness.start_operator()
    status = await harness.wait_phase("outlives-the-operator")
    assert status["phase"] == "Succeeded", status
    assert await output_of(store, run_id, "total#0") == 0 + 1 + 4
    from dagkube.planning.model import Plan

    plan = Plan.model_validate_json(await store.get(hist_run(run_id, "plan")))
    logical = {t.worker_id for t in plan.tasks.values()}
    assert len(harness.run_pods(run_id)) <= len(logical), (harness.run_pods(run_id).keys(), logical)
    events = [reason for _, reason, _ in await harness.events("outlives-the-operator")]
    assert events.count("Started") == 1


async def test_ttl_after_finished_deletes_the_workflow_its_pods_and_keys(
    harness: Harness, store: Any
) -> None:
    body = workflow(
        "short-lived",
        {"inline": sleepy("short-lived", 0.1, 3)},
        ttlSecondsAfterFinished=2,
        resources={"maxWorkers": 1},
    )
    await harness.create(body)
    status = await harness.wait_phase("short-lived")
    assert status["phase"] == "Succeeded"
    run_id = status["runId"]
    # maxWorkers bounds the run: three ready tasks, one worker Pod serving them in turn.
    assert len(harness.run_pods(run_id)) == 1, harness.run_pods(run_id).keys()

    async def gone() -> bool:
        left = set(await harness.cluster.pods(NAMESPACE)) & set(harness.run_pods(run_id))
        return await harness.cluster.workflow(NAMESPACE, "short-lived") is None and not left

    await wait_for(gone, 30, "the Workflow to be deleted after its TTL")
    assert not await store.exists(RunKeys(run_id).meta, RunKeys(run_id).outputs)
    assert await store.hget(hist_run(run_id, "meta"), "status") == b"succeeded"  # history stays


async def test_timeout_cancels_the_run_and_ends_failed(harness: Harness) -> None:
    body = workflow(
        "too-slow", {"inline": sleepy("too-slow", 60.0, 1)}, timeoutSeconds=2, retries=0
    )
    await harness.create(body)
    status = await harness.wait_phase("too-slow", timeout_s=60)
    assert status["phase"] == "Failed"
    assert "timed out after 2s (spec.timeoutSeconds)" in status["message"]
    [condition] = [c for c in status["conditions"] if c["type"] == "Succeeded"]
    assert condition["reason"] == "Cancelled"

    async def stopped() -> bool:  # the task was not waited for: its Pod is gone
        left = set(await harness.cluster.pods(NAMESPACE)) & set(harness.run_pods(status["runId"]))
        return not left

    await wait_for(stopped, 30, "the timed-out run's Pods to go")


async def test_submit_from_python_and_the_cli(harness: Harness) -> None:
    import dagkube
    from tests.tasks import add

    wf = dagkube.Workflow(add(add(1, 2), add(3, 4)), name="submitted-sum")
    handle = await asyncio.to_thread(
        wf.submit,
        NAMESPACE,
        redis_url=harness.redis_url,
        kube_api_url=harness.cluster.url,
    )
    assert handle.name.startswith("submitted-sum-")
    stored = await harness.cluster.workflow(NAMESPACE, handle.name)
    validate_workflow(stored)
    assert set(stored["spec"]["source"]) == {"ref"}
    assert await asyncio.to_thread(handle.wait, 60) == 10

    env = harness.env()
    cli = [sys.executable, "-m", "dagkube.cli"]
    process = await asyncio.create_subprocess_exec(
        *cli,
        "submit",
        "tests/data/failing_workflow.py",
        "-n",
        NAMESPACE,
        "--wait",
        "--wait-timeout",
        "60",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 1, (stdout, stderr)
    assert b"KeyError" in stderr and b"parse#0" in stderr, stderr
    name = stderr.decode().split("workflow.dagkube.io/")[1].split()[0]
    process = await asyncio.create_subprocess_exec(
        *cli,
        "status",
        name,
        "-n",
        NAMESPACE,
        "--json",
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, _ = await process.communicate()
    assert process.returncode == 1
    status = yaml.safe_load(stdout)
    assert status["phase"] == "Failed" and status["failedTask"] == "parse#0"


async def test_rbac_role_grants_exactly_what_the_operator_used(
    harness: Harness,
    rendered: dict,  # noqa: F811  (the chart fixture imported above)
) -> None:
    """Every API call the operator made in this module is granted by the chart's Role, and the
    Role grants nothing the operator did not use (but the documented rare paths)."""
    granted: set[tuple[str, str, str]] = set()
    for rule in only(rendered["default"], "Role")["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((verb, group, resource))
    used = {
        (verb, group, f"{resource}/{sub}" if sub else resource)
        for verb, group, resource, sub in harness.cluster.emulator.api_calls(
            user_agents=("kopf/", "dagkube-operator/")
        )
    }
    assert ("create", "", "pods") in used and ("patch", "dagkube.io", "workflows/status") in used
    assert used - granted == set(), f"calls the Role does not grant: {sorted(used - granted)}"
    rare = {
        ("get", "", "pods"),  # a create that met an existing Pod: adopt it (a retried create)
        # not a call: admission wants it to set blockOwnerDeletion on Pods a Workflow owns
        ("update", "dagkube.io", "workflows/finalizers"),
    }
    assert granted - used - rare == set(), (
        f"granted but never used: {sorted(granted - used - rare)}"
    )
