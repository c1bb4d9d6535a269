"""Pure parts of the local cluster harness: DNS, quantities, images, env, QoS, PKI, config."""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from localcluster.agent import dns, quantity
from localcluster.agent.volumes import ConfigError, expand, field_value
from localcluster.config import ClusterConfig, ClusterState, NodeSpec
from localcluster.images import HOST_PATH, ImagePullError, resolve
from localcluster.pki import ClusterPKI

# --- DNS ---------------------------------------------------------------------------------------

QR, AA, RD = 0x8000, 0x0400, 0x0100
WEB_IP = "10.96.12.34"


def query(name: str, qtype: int = dns.TYPE_A, *, ident: int = 0x1D2C, flags: int = RD) -> bytes:
    """A DNS query packet as a stub resolver sends it: header, one question (class IN)."""
    header = struct.pack("!HHHHHH", ident, flags, 1, 0, 0, 0)
    labels = b"".join(bytes([len(label)]) + label.encode() for label in name.split("."))
    return header + labels + b"\x00" + struct.pack("!HH", qtype, 1)


@dataclass
class Reply:
    ident: int
    flags: int
    qdcount: int
    question: bytes
    answers: list[tuple[int, int, str]]  # (type, ttl, address) of each answer record

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def addresses(self) -> list[str]:
        return [address for _, _, address in self.answers]


def parse_reply(packet: bytes) -> Reply:
    ident, flags, qdcount, ancount, nscount, arcount = struct.unpack("!HHHHHH", packet[:12])
    assert (nscount, arcount) == (0, 0)
    offset = 12
    if qdcount:
        offset = packet.index(b"\x00", 12) + 1 + 4  # the name's end, then type and class
    question = packet[12:offset]
    answers = []
    for _ in range(ancount):
        pointer, rtype, rclass, ttl, length = struct.unpack("!HHHIH", packet[offset : offset + 12])
        assert (pointer, rclass) == (0xC00C, 1)  # the name points at the question; class IN
        data = packet[offset + 12 : offset + 12 + length]
        answers.append((rtype, ttl, str(ipaddress.IPv4Address(data))))
        offset += 12 + length
    assert offset == len(packet), "bytes after the last record"
    return Reply(ident, flags, qdcount, question, answers)


def service(name: str, cluster_ip: str, namespace: str = "ns1") -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "resourceVersion": "812"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080}],
        },
    }


def endpoint(address: str, *, ready: bool | None = True, hostname: str | None = None) -> dict:
    conditions = {} if ready is None else {"ready": ready, "serving": ready, "terminating": False}
    item: dict[str, Any] = {
        "addresses": [address],
        "conditions": conditions,
        "nodeName": "node-0",
        "targetRef": {"kind": "Pod", "namespace": "ns1", "name": f"pod-{address}"},
    }
    if hostname:
        item["hostname"] = hostname
    return item


def endpoint_slice(
    name: str, service_name: str, endpoints: list[dict], namespace: str = "ns1"
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "kubernetes.io/service-name": service_name,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
    }


@pytest.fixture
def records() -> dns.Records:
    table = dns.Records("cluster.local")
    table.set_services([service("web", WEB_IP), service("db", "None")])
    table.set_slices(
        [
            endpoint_slice(
                "db-abc12",
                "db",
                [
                    endpoint("10.244.0.7", hostname="db-0"),
                    endpoint("10.244.0.8", ready=False, hostname="db-1"),
                    endpoint("10.244.0.9", ready=None, hostname="db-2"),  # unknown counts as ready
                ],
            ),
            endpoint_slice("db-def34", "db", [endpoint("10.244.0.3")]),
            endpoint_slice("web-x1", "web", [endpoint("10.244.0.5", hostname="web-0")]),
        ]
    )
    return table


def ask(records: dns.Records, name: str, qtype: int = dns.TYPE_A) -> Reply:
    packet = dns.answer(query(name, qtype), records)
    assert packet is not None
    return parse_reply(packet)


def test_cluster_ip_service_name_answers_its_cluster_ip(records):
    packet = query("web.ns1.svc.cluster.local", ident=0xBEEF)
    reply = parse_reply(dns.answer(packet, records) or b"")
    assert reply.ident == 0xBEEF
    assert reply.flags == QR | AA | RD | dns.NOERROR
    assert reply.qdcount == 1 and reply.question == packet[12:]
    assert reply.answers == [(dns.TYPE_A, dns.TTL_S, WEB_IP)]


def test_any_query_answers_the_a_records(records):
    assert ask(records, "web.ns1.svc.cluster.local", dns.TYPE_ANY).addresses == [WEB_IP]


def test_aaaa_of_a_known_name_is_noerror_without_answers(records):
    reply = ask(records, "web.ns1.svc.cluster.local", dns.TYPE_AAAA)
    assert (reply.rcode, reply.answers) == (dns.NOERROR, [])


@pytest.mark.parametrize(
    "name",
    ["api.ns1.svc.cluster.local", "web.ns2.svc.cluster.local", "example.com", "web.ns1"],
)
def test_unknown_name_is_nxdomain_with_the_question_echoed(records, name):
    packet = query(name)
    reply = parse_reply(dns.answer(packet, records) or b"")
    assert reply.rcode == dns.NXDOMAIN
    assert reply.qdcount == 1 and reply.question == packet[12:]
    assert reply.answers == []


def test_headless_service_answers_its_ready_endpoints_from_all_slices(records):
    reply = ask(records, "db.ns1.svc.cluster.local")
    assert reply.rcode == dns.NOERROR
    assert reply.addresses == ["10.244.0.3", "10.244.0.7", "10.244.0.9"]


def test_statefulset_pod_names_answer_the_pod_address(records):
    assert ask(records, "db-0.db.ns1.svc.cluster.local").addresses == ["10.244.0.7"]
    assert ask(records, "db-2.db.ns1.svc.cluster.local").addresses == ["10.244.0.9"]
    assert ask(records, "db-1.db.ns1.svc.cluster.local").rcode == dns.NXDOMAIN  # not ready


def test_names_are_case_insensitive_and_may_end_with_a_dot(records):
    packet = query("WEB.Ns1.Svc.Cluster.Local")
    reply = parse_reply(dns.answer(packet, records) or b"")
    assert reply.addresses == [WEB_IP]
    assert reply.question == packet[12:]  # echoed as asked
    assert records.lookup("Web.ns1.svc.cluster.local.") == [WEB_IP]


@pytest.mark.parametrize(
    "packet",
    [
        query("web.ns1.svc.cluster.local", flags=QR | AA | RD),  # a response, not a query
        b"\x1d\x2c\x01\x00\x00",  # shorter than a header: nothing to reply to
    ],
    ids=["response", "short"],
)
def test_packets_that_are_not_queries_get_no_reply(records, packet):
    assert dns.answer(packet, records) is None


@pytest.mark.parametrize(
    "cut",
    [
        lambda p: p[:14],  # inside the first label
        lambda p: p[:-4],  # without type and class
        lambda p: p[:-1],  # class cut short
    ],
    ids=["label", "type", "class"],
)
def test_truncated_question_gets_formerr(records, cut):
    reply = parse_reply(dns.answer(cut(query("web.ns1.svc.cluster.local")), records) or b"")
    assert reply.ident == 0x1D2C
    assert reply.flags & QR and reply.rcode == dns.FORMERR
    assert (reply.qdcount, reply.answers) == (0, [])


def test_two_questions_are_formerr_and_other_opcodes_notimp(records):
    two = bytearray(query("web.ns1.svc.cluster.local"))
    two[4:6] = struct.pack("!H", 2)
    assert parse_reply(dns.answer(bytes(two), records) or b"").rcode == dns.FORMERR
    notify = query("web.ns1.svc.cluster.local", flags=4 << 11)
    assert parse_reply(dns.answer(notify, records) or b"").rcode == dns.NOTIMP


def test_watch_events_add_change_and_delete_names():
    table = dns.Records("cluster.local")
    table.set_services([])
    table.set_slices([])
    name = "cache.ns1.svc.cluster.local"
    assert table.lookup(name) is None

    table.service_event("ADDED", service("cache", "None"))
    assert table.lookup(name) == []  # known, no endpoints yet: NOERROR without answers
    table.slice_event("ADDED", endpoint_slice("cache-1", "cache", [endpoint("10.244.0.20")]))
    assert table.lookup(name) == ["10.244.0.20"]
    moved = endpoint_slice("cache-1", "cache", [endpoint("10.244.0.21")])
    table.slice_event("MODIFIED", moved)
    assert table.lookup(name) == ["10.244.0.21"]
    table.service_event("MODIFIED", service("cache", "10.96.0.50"))
    assert table.lookup(name) == ["10.96.0.50"]

    table.service_event("DELETED", service("cache", "10.96.0.50"))
    assert table.lookup(name) is None
    assert ask(table, name).rcode == dns.NXDOMAIN


def test_deleted_slice_removes_its_addresses(records):
    records.slice_event("DELETED", endpoint_slice("db-def34", "db", []))
    assert records.lookup("db.ns1.svc.cluster.local") == ["10.244.0.7", "10.244.0.9"]


async def test_serve_answers_queries_over_udp(records):
    transport = await dns.serve(records, "127.0.0.1", 0)  # port 0: the kernel picks a free one
    try:
        port = transport.get_extra_info("sockname")[1]
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.setblocking(False)
            client.connect(("127.0.0.1", port))
            await loop.sock_sendall(client, query("web.ns1.svc.cluster.local", ident=7))
            known = parse_reply(await asyncio.wait_for(loop.sock_recv(client, 512), 5))
            await loop.sock_sendall(client, query("nope.ns1.svc.cluster.local", ident=8))
            unknown = parse_reply(await asyncio.wait_for(loop.sock_recv(client, 512), 5))
    finally:
        transport.close()
    assert (known.ident, known.rcode, known.addresses) == (7, dns.NOERROR, [WEB_IP])
    assert (unknown.ident, unknown.rcode) == (8, dns.NXDOMAIN)


# --- Quantities --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected_bytes"),
    [
        ("512Mi", 512 * 2**20),
        ("1.5Gi", 3 * 2**29),
        ("100M", 100_000_000),
        ("2k", 2000),
        ("1e3", 1000),
        ("2", 2),
        ("286m", 1),  # a fraction of a byte rounds up
        (1024, 1024),
    ],
)
def test_memory_bytes(value, expected_bytes):
    assert quantity.memory_bytes(value) == expected_bytes


@pytest.mark.parametrize(
    ("value", "expected_millis"),
    [("286m", 286), ("2", 2000), ("1.5", 1500), ("1e3", 1_000_000), ("2k", 2_000_000), (2, 2000)],
)
def test_cpu_millis(value, expected_millis):
    assert quantity.cpu_millis(value) == expected_millis


def test_bad_quantity_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match="'12 apples' is not a Kubernetes quantity"):
        quantity.memory_bytes("12 apples")


def test_malformed_number_is_a_value_error_naming_it():
    with pytest.raises(ValueError, match=re.escape("'1.2.3'")):
        quantity.cpu_millis("1.2.3")


# --- Images ------------------------------------------------------------------------------------

WORKER, OPERATOR = "ghcr.io/dagkube/worker:0.1.0", "ghcr.io/dagkube/operator:0.1.0"


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An image store as prepare() leaves it, reduced to the files resolve() checks."""
    for executable in ("dagkube/venv/bin/python", "redis/bin/redis-server"):
        (tmp_path / executable).parent.mkdir(parents=True)
        (tmp_path / executable).touch(mode=0o755)
    return tmp_path


def test_worker_image_runs_the_store_venv_in_the_app_folder(store):
    image = resolve(WORKER, store=store)
    assert image.name == WORKER
    assert image.argv(None, None) == ["python", "-m", "dagkube.worker"]
    assert image.env["PATH"] == f"{store / 'dagkube/venv/bin'}:{HOST_PATH}"
    assert image.env["PYTHONPATH"] == image.workdir == str(store / "dagkube/app")


@pytest.mark.parametrize(
    ("name", "default_argv"),
    [
        ("ghcr.io/dagkube/operator:0.1.0@sha256:abc", ["python", "-m", "dagkube_operator"]),
        ("redis:7.2-alpine", ["redis-server"]),
        ("docker.io/library/redis:7", ["redis-server"]),
        ("busybox:1.36", ["sh"]),
        ("python:3.11", ["python3"]),
    ],
)
def test_images_resolve_to_their_default_command(store, name, default_argv):
    assert resolve(name, store=store).argv(None, None) == default_argv


def test_redis_image_finds_redis_server_on_its_path(store):
    image = resolve("docker.io/library/redis:7", store=store)
    assert image.env["PATH"].split(":")[0] == str(store / "redis/bin")
    assert image.workdir == "/data"


@pytest.mark.parametrize(
    ("name", "command", "args", "expected"),
    [
        # args replace CMD, the ENTRYPOINT stays
        (WORKER, None, ["--pool", "p"], ["python", "-m", "dagkube.worker", "--pool", "p"]),
        ("python:3.11", None, ["python", "-c", "print(1)"], ["python", "-c", "print(1)"]),
        ("redis:7", None, ["redis-server", "--port", "1"], ["redis-server", "--port", "1"]),
        # command replaces the ENTRYPOINT and drops CMD
        (OPERATOR, ["kopf", "run"], None, ["kopf", "run"]),
        ("redis:7", ["redis-cli"], None, ["redis-cli"]),
        (WORKER, ["sh", "-c"], ["echo hi"], ["sh", "-c", "echo hi"]),
    ],
)
def test_argv_follows_kubernetes_command_and_args(store, name, command, args, expected):
    assert resolve(name, store=store).argv(command, args) == expected


def test_unknown_image_is_an_image_pull_error_naming_it(store):
    with pytest.raises(ImagePullError, match=re.escape('failed to pull image "nginx:1.25"')):
        resolve("nginx:1.25", store=store)


@pytest.mark.parametrize("name", ["ghcr.io/dagkube/worker:0.1.0", "redis:7.2-alpine"])
def test_image_missing_from_the_store_is_an_image_pull_error(tmp_path, name):
    with pytest.raises(ImagePullError, match=re.escape(f"image {name}:")):
        resolve(name, store=tmp_path)


# --- Environment expansion and field references -----------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("--url=$(HOST):$(PORT)", "--url=redis:6379"),
        ("$(MISSING)/x", "$(MISSING)/x"),
        ("$$(HOST)", "$(HOST)"),
        ("$$$(HOST)", "$redis"),
        ("cost $5 and $(HOST", "cost $5 and $(HOST"),
    ],
)
def test_expand(text, expected):
    assert expand(text, {"HOST": "redis", "PORT": "6379"}) == expected


POD: dict[str, Any] = {
    "metadata": {
        "name": "worker-0",
        "namespace": "jobs",
        "uid": "0f7c2a1e-8b3d-4c5e-9f60-112233445566",
        "labels": {"app": "dagkube", "pool": "wf-tree"},
        "annotations": {"dagkube.io/run": "tree-1"},
    },
    "spec": {"nodeName": "node-0", "serviceAccountName": "dagkube-worker", "containers": []},
    "status": {"podIP": "10.244.0.9", "hostIP": "10.244.0.1"},
}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "worker-0"),
        ("metadata.namespace", "jobs"),
        ("metadata.uid", "0f7c2a1e-8b3d-4c5e-9f60-112233445566"),
        ("spec.nodeName", "node-0"),
        ("status.podIP", "10.244.0.9"),
        ("metadata.labels['pool']", "wf-tree"),
        ("metadata.annotations['dagkube.io/run']", "tree-1"),
        ("metadata.labels['absent']", ""),
    ],
)
def test_field_value(path, expected):
    assert field_value(POD, path) == expected


def test_field_value_of_a_pod_without_status_is_empty():
    assert field_value({**POD, "status": None}, "status.podIP") == ""


@pytest.mark.parametrize("path", ["spec.containers[0].image", "metadata.labels"])
def test_unsupported_field_path_is_a_config_error_naming_it(path):
    with pytest.raises(ConfigError, match=re.escape(f"fieldRef '{path}' is not supported")):
        field_value(POD, path)


# --- PKI ---------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> ClusterPKI:
    return ClusterPKI(tmp_path / "pki")


def load_cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def extended_key_usage(cert: x509.Certificate) -> list[x509.ObjectIdentifier]:
    return list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_server_certificate_is_signed_by_the_ca_for_its_hosts(pki):
    hosts = ("127.0.0.1", "10.96.0.1", "localhost", "kubernetes.default.svc")
    pair = pki.issue("apiserver", "kube-apiserver", hosts=hosts, server=True)
    cert, ca = load_cert(pair.cert), load_cert(pki.ca.cert)

    assert cert.issuer == ca.subject
    cert.verify_directly_issued_by(ca)  # raises if the CA's key did not sign it
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kube-apiserver"
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.96.0.1"),
    ]
    assert names.get_values_for_type(x509.DNSName) == ["localhost", "kubernetes.default.svc"]
    assert extended_key_usage(cert) == [
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False

    key = serialization.load_pem_private_key(pair.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert stat.S_IMODE(pair.key.stat().st_mode) == 0o600


def test_client_certificate_carries_its_organization(pki):
    pair = pki.issue("admin", "kubernetes-admin", organizations=("system:masters",))
    cert = load_cert(pair.cert)

    cert.verify_directly_issued_by(load_cert(pki.ca.cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kubernetes-admin"
    organizations = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    assert [o.value for o in organizations] == ["system:masters"]
    assert extended_key_usage(cert) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)


def test_issued_files_are_reused_by_later_calls_and_starts(pki):
    first = pki.issue("node-0", "system:node:node-0", organizations=("system:nodes",))
    files = {path: path.read_bytes() for path in (first.cert, first.key, pki.ca.cert, pki.ca.key)}
    files[pki.service_account_key] = pki.service_account_key.read_bytes()

    again = pki.issue("node-0", "system:node:node-0", organizations=("system:nodes",))
    restarted = ClusterPKI(pki.folder).issue("node-0", "system:node:node-0")

    assert again == restarted == first
    assert {path: path.read_bytes() for path in files} == files


# --- Cluster config and state ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pod_cidr", "service_cidr", "bridge_ip", "kubernetes_ip"),
    [
        (None, None, "10.244.0.1", "10.96.0.1"),
        ("10.50.3.0/24", "172.20.0.0/16", "10.50.3.1", "172.20.0.1"),
        ("192.168.64.128/25", "10.100.8.0/22", "192.168.64.129", "10.100.8.1"),
    ],
)
def test_addresses_are_the_first_hosts_of_their_networks(
    tmp_path, pod_cidr, service_cidr, bridge_ip, kubernetes_ip
):
    given = {"pod_cidr": pod_cidr, "service_cidr": service_cidr}
    config = ClusterConfig(tmp_path, **{k: v for k, v in given.items() if v is not None})
    assert (config.bridge_ip, config.kubernetes_service_ip) == (bridge_ip, kubernetes_ip)


@pytest.mark.parametrize("customized", [False, True], ids=["defaults", "customized"])
def test_cluster_state_round_trips_through_state_json(tmp_path, customized):
    config = ClusterConfig(tmp_path)
    state = ClusterState(config)
    if customized:
        config = ClusterConfig(
            tmp_path,
            pod_cidr="10.50.3.0/24",
            bridge="dkbr7",
            nodes=[NodeSpec("node-0"), NodeSpec("node-1", cpu="4", memory="16Gi", pods=50)],
            image_venv=tmp_path / "venv",
        )
        state = ClusterState(
            config,
            ports={"apiserver": 41234, "etcd": 41235},
            pids={"etcd": 1201, "kube-apiserver": 1202},
            started_at=1767268800.5,
            ready_s=7.25,
        )
    state.save()

    assert ClusterState.load(tmp_path) == state
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_cluster_state_of_a_folder_without_one_is_none(tmp_path):
    assert ClusterState.load(tmp_path) is None


# --- Pod addresses -----------------------------------------------------------------------------


def test_pod_addresses_are_handed_out_in_turn_and_a_freed_one_waits_for_the_rest():
    from localcluster.agent.node import Ipam

    ipam = Ipam("10.9.0.0/29")  # .1 is the bridge's: .2 to .6 for Pods
    assert [ipam.allocate(f"p{i}") for i in range(3)] == ["10.9.0.2", "10.9.0.3", "10.9.0.4"]
    ipam.release("p0")
    # Not .2 again at once: a new Pod on a just-freed address meets stale neighbour entries.
    assert ipam.allocate("p3") == "10.9.0.5"
    assert ipam.allocate("p4") == "10.9.0.6"
    assert ipam.allocate("p5") == "10.9.0.2"  # the range wrapped
    assert ipam.allocate("p5") == "10.9.0.2"  # the same Pod keeps its address


def test_a_restarted_agent_keeps_a_pods_address_and_a_full_range_is_an_error():
    from localcluster.agent.node import Ipam
    from localcluster.network import NetworkError

    ipam = Ipam("10.9.0.0/30")  # one address for Pods
    assert ipam.allocate("a", preferred="10.9.0.2") == "10.9.0.2"
    with pytest.raises(NetworkError, match="exhausted"):
        ipam.allocate("b")
