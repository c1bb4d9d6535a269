"""The operator with a TLS Redis (issue 17), its Kubernetes and Redis clients faked: the worker
Secret it makes carries the worker user's rediss:// URL naming the CA at the path the Pods
mount, and the CA itself; its worker Pods mount that key."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from kubernetes_asyncio import client

from dagkube.kubernetes.pods import (
    REDIS_CA_FILE,
    WORKER_REDIS_CA_KEY,
    WORKER_REDIS_SECRET,
    WORKER_REDIS_SECRET_KEY,
    build_worker_pod,
)
from dagkube.store import acl
from dagkube_operator.config import OperatorConfig
from dagkube_operator.core import Operator

CA_PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
OPERATOR_URL = "rediss://dagkube-operator:pw@redis.dk.svc:6379/0?ssl_ca_certs=/op/ca.crt"


class FakeRedis:
    def __init__(self) -> None:
        self.commands: list[tuple[Any, ...]] = []

    async def execute_command(self, *args: Any) -> str:
        self.commands.append(args)
        return "OK"

    async def sadd(self, key: str, *members: str) -> int:
        return len(members)


class FakeCore:
    """CoreV1Api with no Secret yet: records the one created."""

    created: list[tuple[str, dict[str, Any]]]

    def __init__(self, api: Any) -> None:
        self.created = FakeCore.created

    async def read_namespaced_secret(self, name: str, namespace: str) -> Any:
        raise client.ApiException(status=404, reason="Not Found")

    async def create_namespaced_secret(self, namespace: str, body: dict[str, Any]) -> None:
        self.created.append((namespace, body))


@pytest.mark.parametrize("tls", [True, False], ids=["tls", "plain"])
def test_the_worker_secret_and_pods_carry_the_ca_with_tls(
    tls: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca_file = tmp_path / "ca.crt"
    ca_file.write_text(CA_PEM)
    url = OPERATOR_URL if tls else "redis://dagkube-operator:pw@redis.dk.svc:6379/0"
    config = OperatorConfig(redis_url=url, redis_ca_file=str(ca_file) if tls else None)
    FakeCore.created = []
    monkeypatch.setattr(client, "CoreV1Api", FakeCore)
    operator = Operator(config=config, redis=FakeRedis(), api=object())  # type: ignore[arg-type]

    secret = asyncio.run(operator.worker_credentials("team-a"))

    assert secret == (WORKER_REDIS_SECRET, WORKER_REDIS_SECRET_KEY)
    [(namespace, body)] = FakeCore.created
    data = body["stringData"]
    worker_url = data[WORKER_REDIS_SECRET_KEY]
    assert namespace == "team-a"
    assert urlsplit(worker_url).username == acl.worker_user("team-a").name
    if tls:
        assert worker_url.startswith("rediss://dagkube-worker-team-a:")
        assert worker_url.endswith(f"@redis.dk.svc:6379/0?ssl_ca_certs={REDIS_CA_FILE}")
        assert data[WORKER_REDIS_CA_KEY] == CA_PEM
        assert operator.worker_ca_secret == (WORKER_REDIS_SECRET, WORKER_REDIS_CA_KEY)
    else:
        assert worker_url.startswith("redis://") and "ssl_ca_certs" not in worker_url
        assert set(data) == {WORKER_REDIS_SECRET_KEY}
        assert operator.worker_ca_secret is None
    backend = operator.pools.backend(
        namespace="team-a",
        pool="team-a.wp-1",
        settings=operator.pool_settings(None),
        owner=None,
        redis_url_secret=secret,
    )
    assert backend.redis_ca_secret == operator.worker_ca_secret
    pod = build_worker_pod(
        name="dk-1a2b3c4d-512-0",
        namespace="team-a",
        run_id=None,
        pool="team-a.wf-1",
        memory_mib=512,
        image="worker:1",
        redis_url_secret=secret,
        idle_timeout_s=30,
        spawned_at=0.0,
        redis_ca_secret=backend.redis_ca_secret,
    )
    mounted = {v["name"] for v in pod["spec"]["volumes"]}
    assert ("redis-ca" in mounted) is tls
