"""The local control plane, shared by the tests of this package."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="package")
def local_cluster(tmp_path_factory: pytest.TempPathFactory):
    """A real control plane (etcd, kube-apiserver, controller manager, scheduler, kube-proxy)
    and dagkube's node agent with two Nodes, for this package's tests; stopped after the last
    of them (the rest of the suite runs without its load)."""
    from localcluster import controlplane

    from tests.kube import ClusterUnavailable, Kube, start_cluster

    folder = tmp_path_factory.mktemp("cluster")
    try:
        state = start_cluster(folder)
    except ClusterUnavailable as exc:
        pytest.skip(str(exc))
    except controlplane.ClusterError:
        controlplane.stop(folder)
        raise
    try:
        yield Kube(state, controlplane.binaries(build=False)["kubectl"])
    finally:
        controlplane.stop(folder)
