"""The cluster's DNS: Service names to addresses, served over UDP on the bridge address.

``<service>.<namespace>.svc.<domain>`` answers the Service's ClusterIP, or for a headless
Service the addresses of its ready endpoints; ``<hostname>.<service>.<namespace>.svc.<domain>``
answers a StatefulSet Pod's address. Other names get NXDOMAIN (the machine has no network for
Pods to resolve anything else on). The table is fed by watches of Services and EndpointSlices.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections import defaultdict
from typing import Any

log = logging.getLogger("localcluster.dns")

TYPE_A, TYPE_AAAA, TYPE_ANY = 1, 28, 255
NOERROR, FORMERR, NXDOMAIN, NOTIMP = 0, 1, 3, 4
TTL_S = 5


class Records:
    """Names (lower case, no trailing dot) to IPv4 addresses, kept from API objects."""

    def __init__(self, domain: str) -> None:
        self.domain = domain.strip(".").lower()
        self.services: dict[tuple[str, str], dict] = {}
        self.slices: dict[tuple[str, str], dict] = {}
        self.names: dict[str, list[str]] = {}

    def set_services(self, items: list[dict]) -> None:
        self.services = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in items}
        self._rebuild()

    def set_slices(self, items: list[dict]) -> None:
        self.slices = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in items}
        self._rebuild()

    def service_event(self, kind: str, obj: dict) -> None:
        self._apply(self.services, kind, obj)

    def slice_event(self, kind: str, obj: dict) -> None:
        self._apply(self.slices, kind, obj)

    def _apply(self, table: dict, kind: str, obj: dict) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            table.pop(key, None)
        else:
            table[key] = obj
        self._rebuild()

    def _rebuild(self) -> None:
        names: dict[str, list[str]] = defaultdict(list)
        endpoints: dict[tuple[str, str], list[tuple[str, str | None]]] = defaultdict(list)
        for (namespace, _), piece in self.slices.items():
            service = (piece["metadata"].get("labels") or {}).get("kubernetes.io/service-name")
            if not service:
                continue
            for endpoint in piece.get("endpoints") or []:
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                for address in endpoint.get("addresses") or []:
                    endpoints[(namespace, service)].append((address, endpoint.get("hostname")))
        for (namespace, name), service in self.services.items():
            base = f"{name}.{namespace}.svc.{self.domain}".lower()
            cluster_ip = (service.get("spec") or {}).get("clusterIP")
            found = endpoints.get((namespace, name), [])
            if cluster_ip and cluster_ip != "None":
                names[base].append(cluster_ip)
            else:
                names[base].extend(address for address, _ in found)
            for address, hostname in found:
                if hostname:
                    names[f"{hostname}.{base}".lower()].append(address)
        self.names = {k: sorted(set(v)) for k, v in names.items()}

    def lookup(self, name: str) -> list[str] | None:
        """Addresses of ``name``; [] for a known name without addresses; None: no such name."""
        return self.names.get(name.strip(".").lower())


def _read_name(packet: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if offset >= len(packet):
            raise ValueError("truncated name")
        length = packet[offset]
        if length == 0:
            return ".".join(labels), offset + 1
        if length & 0xC0:
            raise ValueError("compressed names are not expected in questions")
        labels.append(packet[offset + 1 : offset + 1 + length].decode("ascii", "replace"))
        offset += 1 + length


def answer(packet: bytes, records: Records) -> bytes | None:
    """The reply to one DNS query packet (None for packets that are not queries)."""
    if len(packet) < 12:
        return None
    ident, flags, qdcount = struct.unpack("!HHH", packet[:6])
    if flags & 0x8000:  # a response, not a query
        return None
    recursion_desired = flags & 0x0100
    opcode = (flags >> 11) & 0xF

    def header(rcode: int, answers: int, question: bytes) -> bytes:
        reply_flags = 0x8000 | (opcode << 11) | 0x0400 | recursion_desired | rcode
        return struct.pack("!HHHHHH", ident, reply_flags, 1 if question else 0, answers, 0, 0)

    if opcode != 0 or qdcount != 1:
        return header(NOTIMP if opcode else FORMERR, 0, b"")
    try:
        name, end = _read_name(packet, 12)
        qtype, _qclass = struct.unpack("!HH", packet[end : end + 4])
    except (ValueError, struct.error):
        return header(FORMERR, 0, b"")
    question = packet[12 : end + 4]
    addresses = records.lookup(name)
    if addresses is None:
        return header(NXDOMAIN, 0, question) + question
    body = b""
    count = 0
    if qtype in (TYPE_A, TYPE_ANY):
        for address in addresses:
            body += struct.pack("!HHHIH", 0xC00C, TYPE_A, 1, TTL_S, 4)
            body += ipaddress.IPv4Address(address).packed
            count += 1
    return header(NOERROR, count, question) + question + body


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, records: Records) -> None:
        self.records = records
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        reply = answer(data, self.records)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)


async def serve(records: Records, host: str, port: int = 53) -> asyncio.BaseTransport:
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _Protocol(records), local_addr=(host, port)
    )
    log.info("cluster DNS on %s:%d", host, port)
    return transport
