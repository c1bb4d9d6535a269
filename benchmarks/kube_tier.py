"""dagkube on the local control plane, side by side with the local runtime: how long a run
takes to get going and how much the operator asks of the API server.

Both engines run the same example modules from the same checkout; every number comes from the
records each run leaves in Redis (the worker and task records of its history), plus, on
Kubernetes, the time the benchmark created the Workflow, the Pod watch and the API server's
audit log.

* Workflow applied -> first task started: from just before the Workflow is created through the
  API (locally: just before ``Workflow.run``) to the first task's start. Split on Kubernetes
  into the operator's part (until the first worker Pod is in the API, as seen by a watch) and
  the rest (scheduling, the node agent starting the container, Python starting, the worker
  registering in Redis, taking the invocation, fetching inputs).
* Cold worker: the scaler asking for a Pod (process) -> the worker registered in Redis.
* Warm hand-off: an invocation taken by a worker already running (warm or pre-warmed), from
  the moment both the invocation and the idle worker exist to the worker taking it.
* Pre-warm lead: for each pre-warmed worker that served a run, how long before its invocation
  was queued it was registered (negative: it came late).
* Operator API load: requests of the operator's ServiceAccount in the API server's audit log
  per second, with no Workflow and from creating 1 or 3 Workflows at once until all have
  ended (watch connections count once).

Usage (root):
    python benchmarks/kube_tier.py [--runs 5] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import benchlib
import redis.asyncio as aioredis

import dagkube
from dagkube.metrics.history import RunHistory, read_run
from dagkube.store.records import WorkerRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples"), str(ROOT / "tools" / "cluster")]

import fanout_sleep  # noqa: E402
import long_then_wide  # noqa: E402
from localcluster import controlplane  # noqa: E402

from tests.kube import Kube, start_cluster, wait_for  # noqa: E402
from tests.release import RELEASE, Release, installed  # noqa: E402

WARMUP_RUNS = 2  # history for the planner (pre-warm needs predictions) before measuring
CASES = {  # name -> (module, planner, optimizations)
    "fanout": (fanout_sleep, "uniform", []),
    "prewarm": (long_then_wide, "wukong", ["prewarm"]),
}


# --- What the records say -------------------------------------------------------------------


def first_task_at(history: RunHistory) -> float:
    return min(t.started_at for t in history.tasks)


def cold_starts(history: RunHistory) -> list[float]:
    return [
        w.registered_at - w.spawned_at
        for w in history.workers
        if w.cold and not w.prewarmed and w.spawned_at and w.registered_at
    ]


def handoffs(history: RunHistory) -> list[float]:
    """Invocations taken by a worker that was already running: taken - max(queued, free)."""
    found, previous = [], {}
    for worker in sorted(history.workers, key=lambda w: w.ready_at or w.finished_at):
        before: WorkerRecord | None = previous.get(worker.worker_id)
        previous[worker.worker_id] = worker
        if worker.ready_at is None or worker.queued_at is None:
            continue
        if before is not None:
            free = before.finished_at
        elif worker.prewarmed and worker.registered_at is not None:
            free = worker.registered_at
        else:
            continue
        found.append(worker.ready_at - max(worker.queued_at, free))
    return found


def prewarm_leads(history: RunHistory) -> list[float]:
    return [
        w.queued_at - w.registered_at
        for w in history.workers
        if w.prewarmed and w.queued_at is not None and w.registered_at is not None
    ]


def percentile(values: list[float], q: float) -> float:
    """Nearest rank: the smallest value with at least q% of the values at or below it."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


# --- The local runtime ------------------------------------------------------------------------


def measure_local(runs: int) -> dict[str, Any]:
    found: dict[str, Any] = {"apply_to_first": [], "cold": [], "handoff": [], "lead": []}
    found["prewarm_used"] = found["prewarm_requested"] = 0
    with (
        tempfile.TemporaryDirectory() as home,
        dagkube.LocalRuntime(home=home, max_workers=8) as rt,
    ):
        for name, (module, planner, optimizations) in CASES.items():
            for index in range(WARMUP_RUNS + runs):
                rt.cool_down()
                wf = module.build()
                began = time.time()
                module.verify(wf.run(planner, "avg", runtime=rt, optimizations=optimizations))
                history = rt.call(read_run(rt.redis, wf.last_run.run_id))
                if index < WARMUP_RUNS:
                    continue
                collect(found, name, history, began)
    return found


def collect(found: dict[str, Any], case: str, history: RunHistory, began: float) -> None:
    if case == "fanout":
        found["apply_to_first"].append(first_task_at(history) - began)
    found["cold"] += cold_starts(history)
    found["handoff"] += handoffs(history)
    if case == "prewarm":
        found["lead"] += prewarm_leads(history)
        found["prewarm_used"] += history.run.workers_prewarmed
        found["prewarm_requested"] += history.run.prewarm_requested


# --- The local control plane ------------------------------------------------------------------


def workflow(
    release: Release, name: str, module: Any, planner: str, optimizations: list[str]
) -> dict:
    return release.workflow(
        name,
        {"module": {"name": f"examples.{module.__name__}:build"}},
        planner={"name": planner, "sla": "avg", "optimizations": optimizations},
        timeoutSeconds=300,
    )


def create(release: Release, body: dict) -> float:
    """Create the Workflow through the API; returns the time just before the call."""
    path = f"/apis/dagkube.io/v1alpha1/namespaces/{release.namespace}/workflows"
    began = time.time()
    status, answer = release.kube.request("POST", path, body)
    if status != 201:
        raise RuntimeError(f"creating Workflow {body['metadata']['name']}: {status} {answer}")
    return began


def read_history(release: Release, run_id: str) -> RunHistory:
    kwargs = release.store.connection_pool.connection_kwargs

    async def read() -> RunHistory | None:
        client = aioredis.Redis(
            host=kwargs["host"], port=kwargs["port"], password=kwargs.get("password")
        )
        try:
            return await read_run(client, run_id)
        finally:
            await client.aclose()

    history = asyncio.run(read())
    if history is None:
        raise RuntimeError(f"run {run_id} left no history")
    return history


def run_one(release: Release, case: str) -> tuple[RunHistory, float, float | None]:
    """One Workflow of ``case`` to Succeeded: its history, when it was created, and when its
    first worker Pod was first seen in the API."""
    module, planner, optimizations = CASES[case]
    name = f"{case}-{uuid.uuid4().hex[:6]}"
    began = create(release, workflow(release, name, module, planner, optimizations))
    status = release.wait_phase(name, timeout_s=300)
    if status.get("phase") != "Succeeded":
        raise RuntimeError(f"Workflow {name} ended {status.get('phase')}: {status}")
    run_id = status["runId"]
    pods = release.seen_pods(run_id)
    seen = [release.recorder.first_seen[p["metadata"]["name"]] for p in pods]
    history = read_history(release, run_id)
    release.kube.request(
        "DELETE", f"/apis/dagkube.io/v1alpha1/namespaces/{release.namespace}/workflows/{name}"
    )
    # The next run starts on a quiet cluster: this one's Pods are gone (their workers' exits
    # would otherwise compete with the next build for the two cores).
    wait_for(lambda: not release.run_pods(run_id), 120, f"the Pods of run {run_id} to go")
    return history, began, min(seen) if seen else None


def operator_steps(
    found: dict[str, Any], history: RunHistory, began: float, pod_seen: float
) -> None:
    """The operator's part split: Workflow created -> run launched in Redis (the create event
    reaches the operator, it builds the DAG and plans) -> the scaler asks for the first Pod ->
    that Pod is in the API (the create call, seen by a watch)."""
    asked = [w.spawned_at for w in history.workers if w.cold and w.spawned_at is not None]
    if not asked:
        return
    found["to_launch"].append(history.run.submitted_at - began)
    found["to_ask"].append(min(asked) - history.run.submitted_at)
    found["to_pod"].append(pod_seen - min(asked))


def operator_requests(kube: Kube, namespace: str, since: float, until: float) -> int:
    """Requests of the operator's ServiceAccount the API server received in [since, until)."""
    user = f"system:serviceaccount:{namespace}:{RELEASE}"
    audits = set()
    log = kube.state.config.path("logs", "audit.log")
    for line in log.read_text().splitlines():
        if user not in line:
            continue
        entry = json.loads(line)
        if entry.get("user", {}).get("username") != user:
            continue
        received = dt.datetime.fromisoformat(entry["requestReceivedTimestamp"]).timestamp()
        if since <= received < until:
            audits.add(entry["auditID"])
    return len(audits)


def measure_kube(runs: int, idle_s: float) -> dict[str, Any]:
    found: dict[str, Any] = {"apply_to_first": [], "cold": [], "handoff": [], "lead": []}
    found.update(prewarm_used=0, prewarm_requested=0, operator_part=[], load={})
    found.update(to_launch=[], to_ask=[], to_pod=[])
    with tempfile.TemporaryDirectory(prefix="dagkube-bench-") as folder:
        state = start_cluster(Path(folder) / "cluster")
        try:
            kube = Kube(state, controlplane.binaries(build=False)["kubectl"])
            with installed(kube, {"operator.idleTimeoutSeconds": 15}) as release:
                for case in CASES:
                    for index in range(WARMUP_RUNS + runs):
                        history, began, pod_seen = run_one(release, case)
                        if index < WARMUP_RUNS:
                            continue
                        collect(found, case, history, began)
                        if case == "fanout" and pod_seen is not None:
                            found["operator_part"].append(pod_seen - began)
                            operator_steps(found, history, began, pod_seen)
                found["load"] = api_load(release, idle_s)
        finally:
            controlplane.stop(state.config.folder)
    return found


def api_load(release: Release, idle_s: float) -> dict[str, float]:
    """The operator's requests per second with no Workflow, then with 1 and 3 running at once
    (each examples/long_then_wide.py: a 3 s task, then a fan-out)."""
    kube, namespace = release.kube, release.namespace
    time.sleep(5)  # the last run's clean-up is over
    began = time.time()
    time.sleep(idle_s)
    load = {"idle": operator_requests(kube, namespace, began, time.time()) / idle_s}
    for count in (1, 3):
        names = [f"load-{count}-{i}-{uuid.uuid4().hex[:4]}" for i in range(count)]
        began = time.time()
        for name in names:
            create(release, workflow(release, name, long_then_wide, "wukong", []))
        for name in names:
            release.wait_phase(name, timeout_s=300)
        ended = time.time()
        load[f"{count} running"] = operator_requests(kube, namespace, began, ended) / (
            ended - began
        )
        for name in names:
            path = f"/apis/dagkube.io/v1alpha1/namespaces/{namespace}/workflows/{name}"
            release.kube.request("DELETE", path)
    return load


# --- The page ---------------------------------------------------------------------------------


def ms(value: float) -> str:
    return "-" if value != value else f"{value * 1000:.0f} ms"


def summary_row(what: str, local: list[float], kube: list[float]) -> str:
    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        return f"{ms(statistics.median(values))} / {ms(percentile(values, 99))} (n={len(values)})"

    return f"| {what} | {cell(local)} | {cell(kube)} |"


def late_prewarm(local: dict[str, Any], kube: dict[str, Any]) -> list[str]:
    leads = [statistics.median(e["lead"]) for e in (local, kube) if e["lead"]]
    if not leads or max(leads) >= 0:
        return []
    return [
        "Pre-warmed workers came late (a negative median lead on both engines): the workers one "
        "pre-warm request asks for start together, and on this machine's 2 cores together "
        "take longer than the history's typical cold start, on which the planner's lead is based.",
        "",
    ]


def per_workflow(load: dict[str, float]) -> float:
    """Requests per second each running Workflow adds (the mean over 1 and 3 at once)."""
    extra = [(load[f"{n} running"] - load["idle"]) / n for n in (1, 3) if f"{n} running" in load]
    return statistics.mean(extra) if extra else float("nan")


def markdown(local: dict[str, Any], kube: dict[str, Any], runs: int, argv: list[str]) -> str:
    lines = [
        "## dagkube on the local control plane, next to the local runtime",
        "",
        f"{runs} measured runs per case and engine after {WARMUP_RUNS} unmeasured ones (history "
        "for the planner); every run starts cold (on Kubernetes each Workflow has its own worker "
        "pool; locally the workers are stopped before each run). Cases: `examples/fanout_sleep.py`"
        " (planner uniform, 10 tasks) and `examples/long_then_wide.py` (planner wukong with "
        "`prewarm`). The Kubernetes side is the local control plane of `make cluster-up` (real "
        "kube-apiserver, scheduler and controller manager; Pods run by the node agent as "
        "processes under their cgroup limits) with the chart installed by helm; the workers are "
        "the same Python as locally. Each run starts once the previous run's Pods are gone.",
        "",
        "| | local runtime: median / p99 | local control plane: median / p99 |",
        "| --- | ---: | ---: |",
        summary_row(
            "Workflow applied -> first task started (fanout)",
            local["apply_to_first"],
            kube["apply_to_first"],
        ),
        summary_row(
            "  of which the operator's part: applied -> first worker Pod in the API",
            [],
            kube["operator_part"],
        ),
        summary_row(
            "    created -> run launched (event, DAG built, planned)", [], kube["to_launch"]
        ),
        summary_row("    launched -> scaler asks for the first Pod", [], kube["to_ask"]),
        summary_row("    asked -> the Pod in the API (create call, watch)", [], kube["to_pod"]),
        summary_row("cold worker: asked for -> registered", local["cold"], kube["cold"]),
        summary_row(
            "warm hand-off: work and idle worker -> taken", local["handoff"], kube["handoff"]
        ),
        summary_row(
            "pre-warm lead: registered before its work was queued", local["lead"], kube["lead"]
        ),
        "",
        f"Pre-warmed workers that served a run / requested: local {local['prewarm_used']} / "
        f"{local['prewarm_requested']}, Kubernetes {kube['prewarm_used']} / "
        f"{kube['prewarm_requested']}.",
        "",
        *late_prewarm(local, kube),
        "Operator requests to the API server (its ServiceAccount in the audit log; a watch "
        "counts once): "
        + ", ".join(f"{what}: {rate:.2f}/s" for what, rate in kube["load"].items())
        + f"; per running Workflow above idle: {per_workflow(kube['load']):.2f}/s.",
        "",
        "How it is measured: see the docstring of `benchmarks/kube_tier.py`. Goals from issue 14:"
        " the operator's share of a cold start under 0.5 s, a warm hand-off p99 under 50 ms.",
        "",
        *benchlib.provenance(__file__, argv),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="measured runs per case (5)")
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle load (30)")
    parser.add_argument("--markdown", type=Path, help="write the section into this page")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1, not {args.runs}")
    local = measure_local(args.runs)
    kube = measure_kube(args.runs, args.idle)
    text = markdown(local, kube, args.runs, sys.argv[1:] if argv is None else argv)
    print(text)
    if args.markdown:
        benchlib.write_section(args.markdown, "kube-tier", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
