"""What a local cluster is made of: its folder, addresses, nodes and the binaries it runs.

A cluster lives in one folder (``build/cluster`` for ``make cluster-up``, a temporary one for
the test session). ``state.json`` in it records the ports and process ids of a running
cluster, so ``down`` works from another process. Addresses are private: the control plane
listens on 127.0.0.1 only; Pods live on a host-only bridge in ``pod_cidr``; Services get
virtual IPs from ``service_cidr`` (kube-proxy's iptables rules), names from the node agent's
DNS server on the bridge address.
"""

from __future__ import annotations

import ipaddress
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


@dataclass
class NodeSpec:
    name: str
    cpu: str = "2"
    memory: str = "8Gi"
    pods: int = 110


@dataclass
class ClusterConfig:
    folder: Path
    pod_cidr: str = "10.244.0.0/24"
    service_cidr: str = "10.96.0.0/16"
    cluster_domain: str = "cluster.local"
    bridge: str = "dkbr0"
    nodes: list[NodeSpec] = field(default_factory=lambda: [NodeSpec("node-0")])
    # Images the node agent can "pull": see localcluster.images.
    image_venv: Path | None = None

    @property
    def bridge_ip(self) -> str:
        """The host's address on the Pod bridge: Pods' gateway, DNS server and API address."""
        return str(next(ipaddress.ip_network(self.pod_cidr).hosts()))

    @property
    def kubernetes_service_ip(self) -> str:
        return str(next(ipaddress.ip_network(self.service_cidr).hosts()))

    @property
    def netns_prefix(self) -> str:
        return f"{self.bridge}-"

    def path(self, *parts: str) -> Path:
        return self.folder.joinpath(*parts)

    @property
    def kubeconfig(self) -> Path:
        return self.path("kubeconfig")

    @property
    def state_file(self) -> Path:
        return self.path("state.json")

    def to_json(self) -> dict:
        data = asdict(self)
        data["folder"] = str(self.folder)
        data["image_venv"] = str(self.image_venv) if self.image_venv else None
        return data

    @classmethod
    def from_json(cls, data: dict) -> ClusterConfig:
        data = dict(data)
        data["folder"] = Path(data["folder"])
        data["nodes"] = [NodeSpec(**n) for n in data.get("nodes") or []]
        data["image_venv"] = Path(data["image_venv"]) if data.get("image_venv") else None
        return cls(**data)


@dataclass
class ClusterState:
    """Ports and processes of a running cluster (``state.json``)."""

    config: ClusterConfig
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    started_at: float = 0.0
    ready_s: float | None = None

    def save(self) -> None:
        data = {
            "config": self.config.to_json(),
            "ports": self.ports,
            "pids": self.pids,
            "started_at": self.started_at,
            "ready_s": self.ready_s,
        }
        tmp = self.config.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, self.config.state_file)

    @classmethod
    def load(cls, folder: Path) -> ClusterState | None:
        path = folder / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            config=ClusterConfig.from_json(data["config"]),
            ports=data.get("ports") or {},
            pids=data.get("pids") or {},
            started_at=data.get("started_at") or 0.0,
            ready_s=data.get("ready_s"),
        )

    @property
    def api_url(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"
