"""What a local cluster that ended without being stopped leaves behind (its test session was
killed) is cleaned up by the next one, never refused forever; a live cluster is left alone.

Runs as root with real links and network namespaces, without starting a control plane."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from localcluster import controlplane, network
from localcluster.config import ClusterConfig, ClusterState

BRIDGE = "dkstale9"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def link_exists(name: str) -> bool:
    return subprocess.run(["ip", "link", "show", name], capture_output=True).returncode == 0


def namespaces() -> list[str]:
    return sorted(p.name for p in Path("/run/netns").glob(f"{BRIDGE}-*"))


def dead_pid() -> int:
    done = subprocess.Popen(["true"])
    done.wait()
    return done.pid


@pytest.fixture
def leftovers(tmp_path: Path):
    """A bridge, a Pod namespace with a process in it, and the owner record of a cluster whose
    processes are gone, as a killed session leaves them."""
    config = ClusterConfig(folder=tmp_path / "cluster", bridge=BRIDGE, pod_cidr="10.246.0.0/24")
    config.folder.mkdir()
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    netns = f"{BRIDGE}-0123456789ab"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", netns, "sleep", "600"])
    network.OWNERS.mkdir(parents=True, exist_ok=True)
    (network.OWNERS / f"{BRIDGE}.owner").write_text(str(config.folder))
    yield config, sleeper
    sleeper.kill()
    sleeper.wait()
    subprocess.run(["ip", "netns", "del", netns], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)
    (network.OWNERS / f"{BRIDGE}.owner").unlink(missing_ok=True)


def test_a_dead_clusters_bridge_namespaces_and_processes_are_removed(leftovers):
    config, sleeper = leftovers
    ClusterState(config=config, pids={"etcd": dead_pid(), "apiserver": dead_pid()}).save()
    assert network.alive_owner(BRIDGE) is None

    assert controlplane.clear_stale(BRIDGE) == config.folder

    assert not link_exists(BRIDGE)
    assert namespaces() == []
    assert sleeper.wait(timeout=10) != 0  # killed with its namespace
    assert network.bridge_owner(BRIDGE) is None
    assert not config.state_file.exists()


def test_leftovers_without_a_state_file_are_found_by_the_bridge_name(leftovers):
    config, _ = leftovers
    assert not config.state_file.exists()
    assert controlplane.clear_stale(BRIDGE) == config.folder
    assert not link_exists(BRIDGE)
    assert namespaces() == []
    assert network.bridge_owner(BRIDGE) is None


def test_a_live_cluster_is_left_alone(leftovers):
    config, sleeper = leftovers
    ClusterState(config=config, pids={"etcd": os.getpid()}).save()
    assert network.alive_owner(BRIDGE) == config.folder
    assert BRIDGE in network.live_clusters()

    assert controlplane.clear_stale(BRIDGE) is None

    assert link_exists(BRIDGE)
    assert len(namespaces()) == 1
    assert sleeper.poll() is None
    assert json.loads(config.state_file.read_text())["pids"] == {"etcd": os.getpid()}
