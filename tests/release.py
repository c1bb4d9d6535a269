"""The dagkube chart installed with the real helm on a local cluster (tests/kube.py): shared by
the operator's tests and the benchmark of this tier (benchmarks/kube_tier.py)."""

from __future__ import annotations

import base64
import contextlib
import json
import pickle
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import yaml

from dagkube.kubernetes.pods import LABEL_POOL, LABEL_RUN
from dagkube.store.keys import RunKeys, local_part, namespaced, worker_proc
from tests.kube import Kube, PodRecorder, wait_for

ROOT = Path(__file__).resolve().parents[1]
CHART = ROOT / "charts" / "dagkube"
RELEASE = "dagkube"
OPERATOR_IMAGE = "localhost/dagkube/operator"
WORKER_IMAGE = "localhost/dagkube/worker"
RUN_TIMEOUT_S = 240.0


def helm_binary() -> Path:
    from tools.k8s_binaries import ensure

    return ensure()["helm"]


@dataclass
class Release:
    """The chart installed in a namespace of its own, and ways into it."""

    kube: Kube
    namespace: str
    store: redis.Redis
    recorder: PodRecorder

    def workflow(self, name: str, source: dict[str, Any], **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": "dagkube.io/v1alpha1",
            "kind": "Workflow",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {"source": source, **spec},
        }

    def manifest(self, path: str) -> dict[str, Any]:
        body = yaml.safe_load((ROOT / path).read_text())
        body["metadata"]["namespace"] = self.namespace
        return body

    def apply(self, body: dict[str, Any]) -> None:
        self.kube.apply(body, self.namespace)

    def status(self, name: str) -> dict[str, Any]:
        found = self.kube.get("workflow", name, self.namespace)
        return dict((found or {}).get("status") or {})

    def wait_phase(
        self,
        name: str,
        phases: tuple[str, ...] = ("Succeeded", "Failed"),
        timeout_s: float = RUN_TIMEOUT_S,
    ) -> dict[str, Any]:
        return dict(
            wait_for(
                lambda: (s := self.status(name)).get("phase") in phases and s,
                timeout_s,
                f"Workflow {name} to reach {' or '.join(phases)}",
                every_s=0.5,
            )
        )

    def events(self, name: str) -> list[tuple[str, str, str]]:
        items = self.kube.list("events", self.namespace)
        return [
            (e.get("type", ""), e.get("reason", ""), e.get("message", ""))
            for e in items
            if (e.get("involvedObject") or {}).get("name") == name
        ]

    def run_pods(self, run_id: str) -> list[dict[str, Any]]:
        """The run's worker Pods in the API now."""
        # (labels carry the run id without its namespace: it fits a label value)
        return self.kube.list("pods", self.namespace, f"{LABEL_RUN}={local_part(run_id)}")

    def seen_pods(self, run_id: str) -> list[dict[str, Any]]:
        """Every worker Pod the run had, as last seen (also those removed since)."""
        return self.recorder.with_label(LABEL_RUN, local_part(run_id))

    def describe_pods(self, pods: list[dict[str, Any]]) -> str:
        """One line per worker Pod, for a failing assertion: when it was created, why (the run
        whose demand or pre-warm it was made for), its phase."""
        lines = []
        for pod in sorted(pods, key=lambda p: p["metadata"]["creationTimestamp"]):
            [container] = pod["spec"]["containers"]
            env = {v["name"]: v.get("value") for v in container.get("env") or []}
            why = (
                f"pre-warm for {env['DAGKUBE_PREWARM_RUN']}"
                if "DAGKUBE_PREWARM_RUN" in env
                else f"demand of {env.get('DAGKUBE_DEMAND_RUN')}"
            )
            phase = (pod.get("status") or {}).get("phase")
            lines.append(
                f"{pod['metadata']['name']} created {pod['metadata']['creationTimestamp']} "
                f"(spawned {env.get('DAGKUBE_SPAWNED_AT')}), {why}, {phase}"
            )
        return "\n".join(lines)

    def serving_pods(self, run_id: str) -> list[dict[str, Any]]:
        """The worker Pods holding work of the run now (in its tasks or bound to it), whatever
        run they were created for: a pool's Pods serve every run of the pool."""
        pods = self.kube.list("pods", self.namespace, "dagkube.io/component=worker")
        return [
            pod
            for pod in pods
            if any(
                json.loads(held).get("run") == run_id
                for held in self.store.lrange(self.worker_proc_of(pod), 0, -1)
            )
        ]

    def build_pods(self) -> list[dict[str, Any]]:
        """The build Pods in the API now."""
        return self.kube.list("pods", self.namespace, "dagkube.io/component=build")

    def worker_proc_of(self, pod: dict[str, Any]) -> str:
        """The Redis list of the work a worker Pod holds (its pool's keys, in the namespace)."""
        pool = namespaced(self.namespace, pod["metadata"]["labels"][LABEL_POOL])
        return worker_proc(pod["metadata"]["name"], pool)

    def output_of(self, run_id: str, task_id: str) -> Any:
        blob = self.store.hget(RunKeys(run_id).outputs, task_id)
        assert blob is not None, f"run {run_id} has no stored output of {task_id}"
        return pickle.loads(blob)

    def operator_pod(self) -> dict[str, Any] | None:
        pods = self.kube.list("pods", self.namespace, "app.kubernetes.io/component=operator")
        running = [
            p
            for p in pods
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
        ]
        return running[0] if running else None


def redis_of(kube: Kube, namespace: str) -> redis.Redis:
    """A client of the chart's Redis from this machine: the address of its Service's endpoint
    (a headless Service; Pod addresses are reachable from the host over the bridge) and the
    password from the chart's Secret."""
    secret = kube.get("secret", f"{RELEASE}-redis", namespace)
    password = base64.b64decode(secret["data"]["redis-password"]).decode()
    slices = kube.list("endpointslices", namespace, f"kubernetes.io/service-name={RELEASE}-redis")
    [address] = {
        a for piece in slices for e in piece.get("endpoints") or [] for a in e["addresses"]
    }
    return redis.Redis(host=address, port=6379, password=password, socket_timeout=10)


@contextlib.contextmanager
def installed(kube: Kube, values: dict[str, Any] | None = None) -> Iterator[Release]:
    """The chart installed in a namespace of its own (``helm install --wait``) with the local
    images and ``values`` (``--set`` pairs); uninstalled, with its namespace, afterwards."""
    namespace = f"dk-{uuid.uuid4().hex[:6]}"
    env = {
        "KUBECONFIG": str(kube.kubeconfig),
        "HOME": str(kube.state.config.folder),
        "PATH": "/usr/bin:/bin",
    }
    settings = {
        "operator.image.repository": OPERATOR_IMAGE,
        "operator.image.tag": "dev",
        "worker.image.repository": WORKER_IMAGE,
        "worker.image.tag": "dev",
        **(values or {}),
    }
    sets = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    # The Workflow CRD outlives an uninstall (resource-policy keep) with the ownership of the
    # release that made it: a release in another namespace adopts it, as a user reinstalling
    # elsewhere would (helm refuses to take over what names another release's namespace).
    if kube.get("crd", "workflows.dagkube.io", "") is not None:
        kube.kubectl(
            "annotate", "crd", "workflows.dagkube.io", "--overwrite",
            f"meta.helm.sh/release-name={RELEASE}", f"meta.helm.sh/release-namespace={namespace}",
        )  # fmt: skip
    done = subprocess.run(
        [str(helm_binary()), "install", RELEASE, str(CHART), "-n", namespace, "--create-namespace",
         "--wait", "--timeout", "240s", *sets],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        print(kube.kubectl("get", "pods,events", "-n", namespace, check=False).stdout)
        raise AssertionError(f"helm install failed: {done.stderr}")
    store = redis_of(kube, namespace)
    wait_for(lambda: store.ping(), 30, "the chart's Redis to answer from the host")
    recorder = PodRecorder(kube, namespace)
    try:
        yield Release(kube, namespace, store, recorder)
    finally:
        recorder.stop()
        store.close()
        kube.kubectl("delete", "workflows", "--all", "-n", namespace, "--wait=false", check=False)
        uninstall = [str(helm_binary()), "uninstall", RELEASE, "-n", namespace, "--wait"]
        subprocess.run(uninstall, capture_output=True, env=env, timeout=180)
        kube.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
