"""The identities the control plane starts with: the API server's serving and kubelet-client
certificates, and a kubeconfig (one client certificate each) for the admin, the controller
manager, the scheduler, kube-proxy and every node. Certificates come from :mod:`localcluster.pki`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from localcluster.config import ClusterConfig
from localcluster.pki import ClusterPKI, KeyPair

# The components that talk to the API server through a kubeconfig of their own, and their users.
COMPONENT_USERS = (
    ("controller-manager", "system:kube-controller-manager"),
    ("scheduler", "system:kube-scheduler"),
    ("kube-proxy", "system:kube-proxy"),
)


@dataclass(frozen=True)
class Credentials:
    """What the control plane's command lines refer to; ``kubeconfigs`` is keyed by component."""

    server: str
    apiserver: KeyPair
    admin: KeyPair
    kubelet_client: KeyPair
    kubeconfigs: dict[str, Path]


def write_kubeconfig(
    path: Path, server: str, ca: Path, client: KeyPair, user: str, namespace: str = "default"
) -> Path:
    """A kubeconfig with one cluster, one user (a client certificate) and one context."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "local", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(client.cert),
                    "client-key": str(client.key),
                },
            }
        ],
        "contexts": [
            {
                "name": "local",
                "context": {"cluster": "local", "user": user, "namespace": namespace},
            }
        ],
        "current-context": "local",
    }
    path.write_text(json.dumps(config, indent=2))  # JSON is YAML; kubectl and helm read it
    path.chmod(0o600)
    return path


def issue_credentials(config: ClusterConfig, pki: ClusterPKI, server: str) -> Credentials:
    """Issue every certificate and write every kubeconfig for an API server at ``server``:
    the admin's at ``config.kubeconfig``, the others as ``<component>.kubeconfig`` and
    ``node-<name>.kubeconfig`` in the cluster folder."""
    apiserver = pki.issue(
        "apiserver",
        "kube-apiserver",
        hosts=(
            "127.0.0.1",
            "localhost",
            config.bridge_ip,
            config.kubernetes_service_ip,
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            f"kubernetes.default.svc.{config.cluster_domain}",
        ),
        server=True,
    )
    admin = pki.issue("admin", "admin", organizations=("system:masters",))
    kubelet_client = pki.issue("apiserver-kubelet-client", "kube-apiserver-kubelet-client")
    write_kubeconfig(config.kubeconfig, server, pki.ca.cert, admin, "admin")
    kubeconfigs = {}
    for component, user in COMPONENT_USERS:
        pair = pki.issue(component, user)
        kubeconfigs[component] = write_kubeconfig(
            config.path(f"{component}.kubeconfig"), server, pki.ca.cert, pair, user
        )
    for node in config.nodes:
        pair = pki.issue(
            f"node-{node.name}", f"system:node:{node.name}", organizations=("system:nodes",)
        )
        write_kubeconfig(
            config.path(f"node-{node.name}.kubeconfig"), server, pki.ca.cert, pair, node.name
        )
    return Credentials(server, apiserver, admin, kubelet_client, kubeconfigs)
