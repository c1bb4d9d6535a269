"""The local control plane: how long its binaries take to build, how long a cluster takes to
start, and how long a Pod takes from create to Running.

* Build: ``--cold`` builds tools/cluster/build.sh into empty Go module and build caches and an
  empty binary cache (what a fresh machine does; about a quarter of an hour on 2 cores), then
  once more with the Go caches warm but the binary cache empty (what a change of build.sh or of
  a wrapper's go.mod costs). Without ``--cold`` the section keeps the build numbers it has.
* Start-to-Ready: ``up`` of a fresh cluster folder (PKI, etcd, API server, controller manager,
  scheduler, node agent, kube-proxy) until every Node is Ready and the default ServiceAccount
  exists; the image store is prepared before the clock starts.
* Pod create -> Running: a busybox Pod (``sleep``) created through the API, timed from the
  create call to the first watch event that reports it Running. "one at a time" waits for each
  Pod before creating the next; "burst" creates them all at once.

Usage (root):
    python benchmarks/cluster.py [--pods 50] [--starts 3] [--cold] [--markdown docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import benchlib

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools" / "cluster")]

from localcluster import controlplane, images  # noqa: E402
from localcluster.config import ClusterConfig, ClusterState  # noqa: E402

NAMESPACE = "default"


class Api:
    """Admin calls with the cluster's client certificate (stdlib only)."""

    def __init__(self, state: ClusterState) -> None:
        pki = state.config.path("pki")
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        self.base = state.api_url

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.base + path,
            json.dumps(body).encode() if body is not None else None,
            {"Content-Type": "application/json"},
            method=method,
        )
        with urllib.request.urlopen(request, context=self.context, timeout=30) as response:
            return dict(json.loads(response.read()))

    def stream(self, path: str) -> object:
        request = urllib.request.Request(self.base + path)
        return urllib.request.urlopen(request, context=self.context, timeout=600)


def pod(name: str) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"bench": "pods"}},
        "spec": {
            "terminationGracePeriodSeconds": 0,
            "containers": [{"name": "main", "image": "busybox", "command": ["sleep", "3600"]}],
        },
    }


class RunningWatch:
    """Records when each Pod is first reported Running (a watch on the namespace)."""

    def __init__(self, api: Api, version: str) -> None:
        self.running: dict[str, float] = {}
        self.changed = threading.Condition()
        self.response = api.stream(
            f"/api/v1/namespaces/{NAMESPACE}/pods?watch=1&labelSelector=bench%3Dpods"
            f"&resourceVersion={version}"
        )
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        with contextlib.suppress(OSError):
            for line in self.response:  # type: ignore[attr-defined]
                try:
                    event = json.loads(line)
                except ValueError:
                    print(f"watch: undecodable line of {len(line)} bytes: {line[:200]!r}")
                    raise
                obj = event["object"]
                if (obj.get("status") or {}).get("phase") == "Running":
                    with self.changed:
                        self.running.setdefault(obj["metadata"]["name"], time.monotonic())
                        self.changed.notify_all()

    def wait(self, names: list[str], timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        with self.changed:
            while not all(n in self.running for n in names):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    missing = [n for n in names if n not in self.running]
                    raise TimeoutError(f"Pods not Running after {timeout_s}s: {missing[:5]}")
                self.changed.wait(remaining)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def pod_latencies(api: Api, count: int, burst: bool) -> list[float]:
    version = api.call("GET", f"/api/v1/namespaces/{NAMESPACE}/pods")["metadata"]["resourceVersion"]
    watch = RunningWatch(api, version)
    prefix = f"bench-{'burst' if burst else 'seq'}-{int(time.time())}"
    names = [f"{prefix}-{i}" for i in range(count)]
    created: dict[str, float] = {}
    try:
        for name in names:
            created[name] = time.monotonic()
            api.call("POST", f"/api/v1/namespaces/{NAMESPACE}/pods", pod(name))
            if not burst:
                watch.wait([name])
        watch.wait(names)
    finally:  # the watch's daemon thread ends with the process (closing it would block)
        with contextlib.suppress(Exception):
            api.call(
                "DELETE",
                f"/api/v1/namespaces/{NAMESPACE}/pods?labelSelector=bench%3Dpods",
            )
    return [watch.running[n] - created[n] for n in names]


def measure_build(cold_root: Path) -> dict[str, float]:
    """Cold: empty Go caches and binary cache; then warm Go caches, empty binary cache."""
    results = {}
    env = {
        **os.environ,
        "GOMODCACHE": str(cold_root / "gomod"),
        "GOCACHE": str(cold_root / "gobuild"),
        "DAGKUBE_CACHE": str(cold_root / "bins"),
    }
    for label in ("cold", "warm Go caches"):
        shutil.rmtree(cold_root / "bins", ignore_errors=True)
        began = time.monotonic()
        subprocess.run([str(controlplane.BUILD_SCRIPT)], env=env, check=True, capture_output=True)
        results[label] = time.monotonic() - began
    with contextlib.suppress(OSError):  # the module cache is read-only by design
        subprocess.run(["chmod", "-R", "u+w", str(cold_root)], check=False)
    shutil.rmtree(cold_root, ignore_errors=True)
    return results


def previous_build_rows(page: Path) -> list[str]:
    if not page.exists():
        return []
    text = page.read_text()
    match = re.search(r"<!-- begin cluster -->(.*?)<!-- end cluster -->", text, re.S)
    if not match:
        return []
    return [line for line in match.group(1).splitlines() if line.startswith("| build")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="also time a build from empty caches")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    rows: list[str] = []
    if args.cold:
        builds = measure_build(Path(tempfile.mkdtemp(prefix="dagkube-cold-build-")))
        rows += [f"| build, {label} | {seconds:.0f} s |" for label, seconds in builds.items()]
    elif args.markdown:
        rows += previous_build_rows(args.markdown)
    controlplane.binaries()
    images.prepare()
    starts = []
    for attempt in range(args.starts):
        folder = Path(tempfile.mkdtemp(prefix="dagkube-bench-cluster-"))
        try:
            state = controlplane.start(ClusterConfig(folder=folder))
            starts.append(state.ready_s or 0.0)
            if attempt == args.starts - 1:
                api = Api(state)
                one_at_a_time = pod_latencies(api, args.pods, burst=False)
                burst = pod_latencies(api, args.pods, burst=True)
        finally:
            controlplane.stop(folder)
            shutil.rmtree(folder, ignore_errors=True)
    rows.append(
        f"| start to Ready (warm binaries), median of {len(starts)} | "
        f"{statistics.median(starts):.1f} s (min {min(starts):.1f}, max {max(starts):.1f}) |"
    )
    for label, values in (("one at a time", one_at_a_time), ("burst", burst)):
        p50, p99, worst = (
            1000 * x for x in (percentile(values, 50), percentile(values, 99), max(values))
        )
        rows.append(
            f"| Pod create -> Running, {label}, {len(values)} Pods | "
            f"p50 {p50:.0f} ms, p99 {p99:.0f} ms (max {worst:.0f} ms) |"
        )
    markdown = "\n".join(
        [
            "## Local control plane",
            "",
            "kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy and kubectl "
            "v1.37.2 and etcd v3.7.3 built from Go modules (tools/cluster/build.sh), dagkube's "
            "node agent running Pods as processes in cgroups and network namespaces.",
            "",
            "| what | time |",
            "| --- | ---: |",
            *rows,
            "",
            *benchlib.provenance(__file__, None),
        ]
    )
    print(markdown)
    if args.markdown:
        benchlib.write_section(args.markdown, "cluster", markdown)
        print(f"wrote {args.markdown}")


if __name__ == "__main__":
    main()
