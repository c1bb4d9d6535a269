"""How the operator waits for a build Pod that wrote its outcome: until nothing of it runs
(its container ended), deleting one that lingers; fake API objects, real timing logic."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from dagkube_operator import source


class FakeCore:
    """A build Pod that reports ``phases`` one read after another (the last one repeats); the
    Pod is gone once deleted and ``gone_after_delete`` reads have passed."""

    def __init__(self, phases: list[str], gone_after_delete: int = 1) -> None:
        self.phases = phases
        self.reads = 0
        self.deletes = 0
        self.gone_after_delete = gone_after_delete

    async def read_namespaced_pod(self, name: str, namespace: str) -> object:
        self.reads += 1
        if self.deletes:
            self.gone_after_delete -= 1
            if self.gone_after_delete < 0:
                raise source.client.ApiException(status=404)
        phase = self.phases[min(self.reads - 1, len(self.phases) - 1)]
        return SimpleNamespace(status=SimpleNamespace(phase=phase, container_statuses=[]))

    async def delete_namespaced_pod(self, name: str, namespace: str, **_: object) -> None:
        self.deletes += 1


@pytest.fixture(autouse=True)
def fast(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(source, "POLL_S", 0.001)
    monkeypatch.setattr(source, "EXIT_GRACE_S", 0.05)


async def test_the_operator_reads_once_the_build_container_ended():
    core = FakeCore(["Running", "Running", "Succeeded"])
    await source._until_stopped(core, "dk-1-build", "ns")
    assert (core.reads, core.deletes) == (3, 0)


async def test_a_build_that_lingers_after_its_outcome_is_deleted_first():
    core = FakeCore(["Running"])
    await source._until_stopped(core, "dk-1-build", "ns")
    assert core.deletes == 1
    assert core.gone_after_delete < 0  # waited until the Pod was gone


async def test_a_pod_that_never_goes_ends_the_wait_anyway(caplog):
    core = FakeCore(["Running"], gone_after_delete=10**9)
    await source._until_stopped(core, "dk-1-build", "ns")
    assert core.deletes == 1 and "still running after its deletion" in caplog.text
