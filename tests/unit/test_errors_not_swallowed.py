"""Errors that used to be swallowed whole (issue 12): the expected case is still taken, and
anything else now reaches the caller."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import redis.exceptions
from kubernetes_asyncio import client

import dagkube.store.connection
from dagkube.errors import TaskFailed
from dagkube.kubernetes.submit import SubmittedWorkflow
from dagkube_operator import teardown
from dagkube_operator.config import OperatorConfig
from dagkube_operator.core import Operator
from dagkube_operator.transient import is_transient


class FakeRedis:
    """Answers HGETALL with ``meta`` (or raises it) for every key."""

    def __init__(self, meta: dict[bytes, bytes] | Exception) -> None:
        self.meta = meta
        self.closed = False

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        if isinstance(self.meta, Exception):
            raise self.meta
        return self.meta

    async def aclose(self) -> None:
        self.closed = True


async def failure_with(monkeypatch: pytest.MonkeyPatch, fake: FakeRedis) -> Exception | None:
    async def connect(url: str, **kwargs: Any) -> FakeRedis:
        return fake

    monkeypatch.setattr(dagkube.store.connection, "connect", connect)
    handle = SubmittedWorkflow("wf", "ns", redis_url="redis://r:6379/0")
    return await handle._failure("ns.run-1")


FAILED_RUN = {
    b"run_id": b"ns.run-1",
    b"workflow": b"wf",
    b"structure_hash": b"s",
    b"planner": b"uniform",
    b"sla": b"p50",
    b"status": b"failed",
    b"submitted_at": b"1.0",
    b"tasks_total": b"2",
    b"failed_task": b"t#1",
    b"error": b'{"task_id": "t#1", "function": "t", "exc_type": "ValueError", "message": "no"}',
}


async def test_a_failed_runs_record_gives_its_task_failure(monkeypatch):
    fake = FakeRedis(FAILED_RUN)
    failure = await failure_with(monkeypatch, fake)
    assert isinstance(failure, TaskFailed)
    assert (failure.task_id, failure.exc_type) == ("t#1", "ValueError")
    assert fake.closed


@pytest.mark.parametrize(
    "meta", [{}, redis.exceptions.NoPermissionError("NOPERM no access to 'hgetall'")]
)
async def test_an_expired_or_unreadable_record_falls_back_to_the_status_and_says_so(
    monkeypatch, caplog, meta
):
    fake = FakeRedis(meta)
    with caplog.at_level(logging.WARNING, logger="dagkube.kubernetes"):
        assert await failure_with(monkeypatch, fake) is None
    assert "cannot read the record of run ns.run-1" in caplog.text
    assert fake.closed


async def test_an_unforeseen_error_reading_the_record_is_raised(monkeypatch):
    fake = FakeRedis(RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await failure_with(monkeypatch, fake)
    assert fake.closed


class FakeCustomObjects:
    """Refuses deletions with ``status`` (None: accepts them), ``refusals`` times (None: always)."""

    def __init__(self, status: int | None, refusals: int | None = None) -> None:
        self.status = status
        self.refusals = refusals
        self.deleted: list[tuple[str, str]] = []

    async def delete_namespaced_custom_object(self, group, version, namespace, plural, name):
        if self.status is not None and self.refusals != 0:
            if self.refusals is not None:
                self.refusals -= 1
            raise client.ApiException(status=self.status, reason="from the fake")
        self.deleted.append((namespace, name))


def operator_with(monkeypatch: pytest.MonkeyPatch, api: FakeCustomObjects) -> Operator:
    monkeypatch.setattr(client, "CustomObjectsApi", lambda _: api)
    config = OperatorConfig.from_env({"DAGKUBE_REDIS_URL": "redis://r:6379/0"})
    return Operator(config=config, redis=None, api=None)  # type: ignore[arg-type]


def api_errors(operator: Operator) -> float:
    value = operator.metrics.registry.get_sample_value(
        "dagkube_operator_api_errors_total", {"operation": "delete_workflow"}
    )
    return value or 0.0


@pytest.mark.parametrize("status", [None, 404])
async def test_deleting_a_workflow_that_is_gone_is_no_error(monkeypatch, status):
    api = FakeCustomObjects(status)
    operator = operator_with(monkeypatch, api)
    await operator.delete_workflow("ns", "wf")
    assert api.deleted == ([] if status else [("ns", "wf")])
    assert api_errors(operator) == 0


@pytest.mark.parametrize("status", [403, 500])
async def test_a_refused_deletion_is_raised_and_counted(monkeypatch, status):
    operator = operator_with(monkeypatch, FakeCustomObjects(status))
    with pytest.raises(client.ApiException) as caught:
        await operator.delete_workflow("ns", "wf")
    assert caught.value.status == status
    # supervise retries it (a Role may be fixed meanwhile) rather than failing the Workflow
    assert is_transient(caught.value)
    assert api_errors(operator) == 1


class Stopped:
    """kopf's DaemonStopped: falsy until stopped; its waits are recorded, not slept."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __bool__(self) -> bool:
        return False

    async def wait(self, delay_s: float) -> None:
        self.waits.append(delay_s)


async def expire(monkeypatch, caplog, api: FakeCustomObjects) -> Stopped:
    """The TTL step of a Workflow "wf" whose TTL has passed, against ``api``; its waits."""
    operator = operator_with(monkeypatch, api)
    body = {"metadata": {"namespace": "ns", "name": "wf"}, "spec": {"ttlSecondsAfterFinished": 0}}
    stopped = Stopped()
    logger = logging.getLogger("test.ttl")
    with caplog.at_level(logging.WARNING, logger="test.ttl"):
        await teardown.expire(operator, body, {}, stopped, logger)  # type: ignore[arg-type]
    return stopped


async def test_the_ttl_deletion_is_retried_while_it_is_refused(monkeypatch, caplog):
    api = FakeCustomObjects(403, refusals=2)
    stopped = await expire(monkeypatch, caplog, api)
    assert api.deleted == [("ns", "wf")]
    assert stopped.waits == [1.0, 2.0]
    assert caplog.text.count("cannot delete the Workflow (ApiException") == 2


async def test_the_ttl_deletion_gives_up_after_its_attempts_saying_so(monkeypatch, caplog):
    api = FakeCustomObjects(403, refusals=1000)
    stopped = await expire(monkeypatch, caplog, api)
    assert api.deleted == []
    assert len(stopped.waits) == teardown.TTL_DELETE_ATTEMPTS
    assert "cannot delete the Workflow after 10 attempts" in caplog.text
    assert "kubectl delete workflow wf" in caplog.text
