"""Failures and load on the local control plane: the chart with two operator replicas (kopf
peering, the oldest acts), a replica killed mid-run, and many Workflows at once. One release
serves the module's tests (distinct names)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import threading
import time
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dagkube.store.keys import RunKeys, hist_run
from tests.cluster.test_operator import pod_pids, sleepy
from tests.kube import Kube, wait_for
from tests.release import RELEASE, Release, installed, redis_of

pytestmark = [pytest.mark.cluster, pytest.mark.timeout(900)]

PEERING_LIFETIME_S = 8  # the chart's default
FINALIZER = "dagkube.io/cleanup"


@pytest.fixture(scope="module")
def release(local_cluster: Kube) -> Iterator[Release]:
    values = {"operator.replicas": 2, "operator.idleTimeoutSeconds": 10}
    with installed(local_cluster, values) as release:
        yield release


def operator_pods(release: Release) -> list[dict[str, Any]]:
    pods = release.kube.list("pods", release.namespace, "app.kubernetes.io/component=operator")
    return [
        p
        for p in pods
        if p["status"].get("phase") == "Running"
        and p["status"].get("podIP")
        and not p["metadata"].get("deletionTimestamp")
    ]


def scrape(pod: dict[str, Any]) -> dict[str, float]:
    """An operator Pod's /metrics (over the bridge, as Prometheus would): sample name with its
    labels -> value."""
    url = f"http://{pod['status']['podIP']}:8080/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def total(metrics: dict[str, float], name: str) -> float:
    return sum(v for k, v in metrics.items() if k == name or k.startswith(f"{name},"))


def roles(release: Release) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(acting, standing by) when two replicas run and exactly one of them acts."""
    pods = operator_pods(release)
    if len(pods) != 2:
        return None
    try:
        active = [total(scrape(pod), "dagkube_operator_active") for pod in pods]
    except OSError:  # a replica not serving yet
        return None
    if sorted(active) != [0.0, 1.0]:
        return None
    acting = pods[active.index(1.0)]
    return acting, next(p for p in pods if p is not acting)


def started_events(release: Release, name: str) -> int:
    return sum(1 for _, reason, _ in release.events(name) if reason == "Started")


def test_two_replicas_never_act_on_the_same_workflow(release: Release) -> None:
    acting, standby = wait_for(lambda: roles(release), 120, "one replica acting, one standing by")
    peering = release.kube.get("kopfpeering", "dagkube", release.namespace)
    assert peering is not None
    assert set(peering["status"]) == {acting["metadata"]["name"], standby["metadata"]["name"]}
    names = [f"peered-{i}" for i in range(4)]
    for name in names:
        release.apply(
            release.workflow(name, {"inline": sleepy(name, 0.3, 2)}, resources={"maxWorkers": 2})
        )
    for name in names:
        assert release.wait_phase(name)["phase"] == "Succeeded", name
        assert started_events(release, name) == 1, release.events(name)
    # Everything was done by one replica: the other made no Pod, ended no Workflow, and does
    # not serve the run history (the dashboards' sums would count it twice).
    worked, idle = scrape(acting), scrape(standby)
    assert total(worked, "dagkube_operator_workflows_finished_total") >= len(names)
    assert total(worked, "dagkube_operator_pods_created_total") >= len(names)
    assert total(idle, "dagkube_operator_workflows_finished_total") == 0
    assert total(idle, "dagkube_operator_pods_created_total") == 0
    wait_for(
        lambda: total(scrape(acting), "dagkube_runs_total") >= len(names),
        30,
        "the acting replica to serve the runs' history",
    )
    assert "dagkube_runs_total" not in {key.split(",")[0] for key in scrape(standby)}


def test_a_killed_acting_replica_is_replaced_within_its_peering_lifetime(
    release: Release,
) -> None:
    acting, standby = wait_for(lambda: roles(release), 120, "one replica acting, one standing by")
    release.apply(release.workflow("outlives-its-operator", {"inline": sleepy("outlives", 4.0, 3)}))
    run_id = release.wait_phase("outlives-its-operator", ("Running",), 60)["runId"]
    wait_for(lambda: release.serving_pods(run_id), 60, "the run's first Pods")
    for pid in pod_pids(acting):  # no goodbye: its peering record stays until it expires
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    release.apply(release.workflow("after-the-kill", {"inline": sleepy("after", 0.2, 2)}))
    wait_for(
        lambda: FINALIZER
        in ((release.kube.get("workflow", "after-the-kill", release.namespace) or {})
            .get("metadata", {}).get("finalizers") or []),
        60,
        "a replica to take the new Workflow",
        every_s=0.1,
    )  # fmt: skip
    takeover_s = time.monotonic() - killed
    print(f"\nkilled acting replica -> new Workflow taken: {takeover_s:.1f}s")
    # The record of the killed replica expires at most a lifetime after its last keep-alive.
    assert takeover_s < PEERING_LIFETIME_S + 5
    for name in ("outlives-its-operator", "after-the-kill"):
        status = release.wait_phase(name)
        assert status["phase"] == "Succeeded", status
        assert started_events(release, name) == 1, release.events(name)
    assert release.output_of(run_id, "total#0") == 0 + 1 + 4
    # The replica that stood by acts now; the killed one came back (or was replaced) and
    # stands by.
    now_acting, _ = wait_for(lambda: roles(release), 120, "two replicas again, one acting")
    assert now_acting["metadata"]["uid"] == standby["metadata"]["uid"]


class Sampler:
    """Peak resident memory of a Pod's processes, sampled in a thread: the main process (the
    one that is there all along) and all of them (any child it starts; builds run in Pods)."""

    def __init__(self, pod: dict[str, Any]) -> None:
        self.pod = pod
        self.main_peak = self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        main = min(pod_pids(self.pod))
        while not self._stop.wait(0.25):
            try:
                sizes = {pid: rss_bytes(pid) for pid in pod_pids(self.pod)}
            except AssertionError:  # the Pod is gone
                return
            self.main_peak = max(self.main_peak, sizes.get(main, 0))
            self.total_peak = max(self.total_peak, sum(sizes.values()))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def rss_bytes(pid: int) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def operator_requests(release: Release, since: float, until: float) -> int:
    """API requests of the operator's ServiceAccount received in [since, until] (epoch), from
    the API server's audit log (watches counted once, when they start)."""
    user = f"system:serviceaccount:{release.namespace}:{RELEASE}"
    log = release.kube.state.config.path("logs", "audit.log")
    seen = set()
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event["user"].get("username") != user:
            continue
        received = datetime.fromisoformat(event["requestReceivedTimestamp"]).timestamp()
        if since <= received <= until:
            seen.add(event["auditID"])
    return len(seen)


def test_fifty_concurrent_workflows_all_succeed(release: Release) -> None:
    """50 Workflows applied at once (one kubectl apply), each building its DAG from inline
    source and running it on one worker Pod: all succeed with the right result. Prints the
    operator's peak memory, its API requests per second and the time from apply to each run's
    first task (docs/benchmarks.md)."""
    acting, _ = wait_for(lambda: roles(release), 120, "one replica acting, one standing by")
    names = [f"load-{i:02d}" for i in range(50)]
    bodies = [
        release.workflow(name, {"inline": sleepy(name, 0.2, 2)}, resources={"maxWorkers": 1})
        for name in names
    ]
    sampler = Sampler(acting)
    applied = time.time()
    release.kube.apply(bodies, release.namespace)  # one request each, back to back
    try:
        statuses = {name: release.wait_phase(name, timeout_s=600) for name in names}
    finally:
        sampler.stop()
    done = time.time()
    failed = {n: s for n, s in statuses.items() if s["phase"] != "Succeeded"}
    assert not failed, failed
    first_task = []
    for name, status in statuses.items():
        run_id = status["runId"]
        assert release.output_of(run_id, "total#0") == 0 + 1, name
        tasks = [json.loads(v) for v in release.store.hvals(hist_run(run_id, "tasks"))]
        first_task.append(min(t["started_at"] for t in tasks) - applied)
        assert started_events(release, name) == 1
    requests = operator_requests(release, applied, done)
    first_task.sort()
    print(
        f"\n50 Workflows: all done in {done - applied:.1f}s; operator peak RSS "
        f"{sampler.main_peak / 2**20:.0f} MiB (all its processes "
        f"{sampler.total_peak / 2**20:.0f} MiB); API requests {requests} "
        f"({requests / (done - applied):.1f}/s); apply -> first task: min "
        f"{first_task[0]:.1f}s, median {first_task[len(first_task) // 2]:.1f}s, p90 "
        f"{first_task[int(len(first_task) * 0.9)]:.1f}s, max {first_task[-1]:.1f}s"
    )


CHAOS_S = 120.0  # the two minutes
KILL_EVERY_S = 2.0
MIN_AGE_S = 3.0  # a worker Pod up this long at least (one starting is not yet doing work)


class PodKiller:
    """SIGKILLs the processes of a random worker Pod of the namespace (one up for MIN_AGE_S at
    least) every KILL_EVERY_S, in a thread, as a node losing a Pod's container would."""

    def __init__(self, release: Release) -> None:
        self.release = release
        self.kills = 0
        self.random = random.Random(18)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(KILL_EVERY_S):
            with contextlib.suppress(Exception):  # a Pod that went away meanwhile
                pods = self.release.kube.list(
                    "pods", self.release.namespace, "dagkube.io/component=worker"
                )
                now = datetime.now(UTC)
                old = [
                    p
                    for p in pods
                    if p["status"].get("phase") == "Running"
                    and p["status"].get("startTime")
                    and (now - datetime.fromisoformat(p["status"]["startTime"])).total_seconds()
                    >= MIN_AGE_S
                ]
                if old:
                    for pid in pod_pids(self.random.choice(old)):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGKILL)
                    self.kills += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_workers_killed_every_two_seconds_for_two_minutes(release: Release) -> None:
    """Three workflows run round after round for two minutes while a random worker Pod is
    SIGKILLed every 2 s: every run succeeds with the right result, nothing is lost."""
    killer = PodKiller(release)
    ends = time.monotonic() + CHAOS_S
    runs: list[str] = []
    try:
        while time.monotonic() < ends:
            names = [f"chaos-{lane}-{len(runs) // 3}" for lane in "abc"]
            for name in names:
                release.apply(
                    release.workflow(
                        name, {"inline": sleepy(name, 0.5, 8)}, resources={"maxWorkers": 2}
                    )
                )
            for name in names:
                status = release.wait_phase(name)
                assert status["phase"] == "Succeeded", (name, status)
                assert release.output_of(status["runId"], "total#0") == sum(i * i for i in range(8))
                runs.append(name)
    finally:
        killer.stop()
    lost = sum(
        int(
            float(
                release.store.hget(hist_run(release.status(n)["runId"], "meta"), "workers_lost")
                or 0
            )
        )
        for n in runs
    )
    print(f"\nchaos: {len(runs)} runs, {killer.kills} worker Pods killed, {lost} counted lost")
    assert killer.kills >= CHAOS_S / KILL_EVERY_S / 4, killer.kills  # Pods old enough
    assert lost >= 1


def test_redis_killed_mid_run_ends_it_within_a_minute(release: Release) -> None:
    """The chart's Redis SIGKILLed while a run is in its tasks: the StatefulSet starts it
    again from its append-only file, and the Workflow ends within 60 s of that (resumed, or
    Failed with a reason saying what happened); runs that had finished are still in the
    history. Last in the module: the Redis Pod's address changes."""
    release.apply(release.workflow("before-the-crash", {"inline": sleepy("before", 0.1, 2)}))
    assert release.wait_phase("before-the-crash")["phase"] == "Succeeded"
    earlier = release.status("before-the-crash")["runId"]
    time.sleep(1.5)  # appendfsync everysec: what was written a second ago is on disk
    release.apply(release.workflow("through-the-crash", {"inline": sleepy("through", 6.0, 2)}))
    run_id = release.wait_phase("through-the-crash", ("Running",), 60)["runId"]
    wait_for(
        lambda: release.store.hlen(RunKeys(run_id).outputs) == 0 and release.serving_pods(run_id),
        60,
        "a worker in its task",
    )
    [redis_pod] = release.kube.list("pods", release.namespace, "app.kubernetes.io/component=redis")
    for pid in pod_pids(redis_pod):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    release.store = wait_for(lambda: fresh_store(release), 120, "Redis to answer again")
    back = time.monotonic()
    status = release.wait_phase("through-the-crash", timeout_s=120)
    ended = time.monotonic()
    print(
        f"\nRedis killed: back after {back - killed:.1f}s; the run ended {status['phase']} "
        f"{ended - back:.1f}s later ({status.get('reason')}: {status.get('message')})"
    )
    assert ended - back < 60
    if status["phase"] == "Succeeded":
        assert release.output_of(run_id, "total#0") == 0 + 1
    else:
        assert status.get("reason") and status.get("message"), status
    assert release.store.hget(hist_run(earlier, "meta"), "status") == b"succeeded"


def fresh_store(release: Release) -> Any:
    with contextlib.suppress(Exception):
        store = redis_of(release.kube, release.namespace)
        if store.ping():
            return store
    return None
