"""``python -m localcluster`` (PYTHONPATH=tools/cluster): start, stop and inspect the local cluster.

up [--folder DIR] [--nodes N] [--node-memory 8Gi] [--node-cpu 2]
                    start it; prints start-to-Ready and, last, KUBECONFIG=<path>
down [--folder DIR] stop every process, free every port, remove the Pod network
status [--folder DIR]
logs POD [-n NAMESPACE] [-c CONTAINER] [--previous]
                    a container's log file (also what `kubectl logs` serves)
build               build the control plane's binaries (cached by version)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from localcluster import controlplane
from localcluster.config import ROOT, ClusterConfig, ClusterState, NodeSpec

DEFAULT_FOLDER = ROOT / "build" / "cluster"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m localcluster",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)
    up = commands.add_parser("up", help="start the cluster and wait until it is Ready")
    down = commands.add_parser("down", help="stop the cluster")
    status = commands.add_parser("status", help="what runs, where")
    logs = commands.add_parser("logs", help="a container's log")
    commands.add_parser("build", help="build the control plane's binaries")
    for command in (up, down, status, logs):
        command.add_argument("--folder", type=Path, default=DEFAULT_FOLDER,
                             help=f"the cluster's folder (default {DEFAULT_FOLDER})")  # fmt: skip
    up.add_argument("--nodes", type=int, default=1, help="how many Nodes to register (default 1)")
    # More than a small machine has: each Pod's limits are enforced (cgroups), but a Node of
    # 2 CPUs cannot place a non-uniform plan's 2Gi workers (1.14 CPU each) beside the smaller
    # ones that wait for them, and the run would wait for capacity that never comes.
    up.add_argument("--node-memory", default="16Gi", help="each Node's memory capacity (16Gi)")
    up.add_argument("--node-cpu", default="8", help="each Node's CPU capacity (8)")
    logs.add_argument("pod")
    logs.add_argument("-n", "--namespace", default="default")
    logs.add_argument("-c", "--container")
    logs.add_argument("--previous", action="store_true")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except controlplane.ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    if args.command == "build":
        for name, path in sorted(controlplane.binaries().items()):
            print(f"{name}: {path}")
        return 0
    if args.command == "up":
        if args.nodes < 1:
            print(
                f"error: --nodes {args.nodes}: a cluster needs at least one node", file=sys.stderr
            )
            return 2
        config = ClusterConfig(
            folder=args.folder.resolve(),
            nodes=[
                NodeSpec(f"node-{i}", cpu=args.node_cpu, memory=args.node_memory)
                for i in range(args.nodes)
            ],
        )
        state = controlplane.start(config)
        print(f"cluster ready in {state.ready_s:.1f}s (API server {state.api_url})")
        print(f"logs: {config.path('logs')}")
        print(f"KUBECONFIG={config.kubeconfig}")
        return 0
    if args.command == "down":
        stopped = controlplane.stop(args.folder.resolve())
        print("stopped: " + (", ".join(stopped) if stopped else "nothing was running"))
        return 0
    loaded = ClusterState.load(args.folder.resolve())
    if loaded is None:
        print(f"no cluster in {args.folder} (run: make cluster-up)", file=sys.stderr)
        return 1
    state = loaded
    if args.command == "status":
        for component, pid in state.pids.items():
            alive = controlplane._alive(pid)
            print(f"{component:20} pid {pid:<8} {'running' if alive else 'stopped'}")
        print(f"KUBECONFIG={state.config.kubeconfig}")
        return 0
    base = state.config.path("logs", "pods")
    matches = sorted(base.glob(f"{args.namespace}_{args.pod}_*"), key=lambda p: p.stat().st_mtime)
    if not matches:
        print(f"no logs of pod {args.namespace}/{args.pod}", file=sys.stderr)
        return 1
    folder = matches[-1]
    containers = sorted(p.name for p in folder.iterdir())
    container = args.container or (containers[0] if len(containers) == 1 else None)
    if container is None or container not in containers:
        print(f"choose a container with -c: {', '.join(containers)}", file=sys.stderr)
        return 2
    files = sorted((folder / container).glob("*.log"), key=lambda p: int(p.stem))
    chosen = files[-2] if args.previous and len(files) > 1 else files[-1]
    sys.stdout.write(chosen.read_text(errors="replace"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
