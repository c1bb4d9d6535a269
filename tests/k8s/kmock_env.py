"""A real Kubernetes API emulator for tests: kmock's KubernetesEmulator on a free loopback port.

``kubernetes_api()`` serves the emulator (with the bundled resource discovery, so Pods and other
built-in kinds are known) and yields an ``EmulatedCluster``: its URL for the client under test,
and a few plain-HTTP helpers that read and change objects the way a kubelet or a user would,
independently of the client library the code under test uses.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import kmock


@dataclass
class EmulatedCluster:
    emulator: kmock.KubernetesEmulator
    url: str
    http: aiohttp.ClientSession

    @staticmethod
    def pods_path(namespace: str, name: str = "") -> str:
        return f"/api/v1/namespaces/{namespace}/pods" + (f"/{name}" if name else "")

    async def pods(self, namespace: str) -> dict[str, dict[str, Any]]:
        """Every Pod of the namespace, by name (the emulator ignores label selectors)."""
        async with self.http.get(self.pods_path(namespace)) as response:
            response.raise_for_status()
            items = (await response.json())["items"]
        return {pod["metadata"]["name"]: pod for pod in items}

    async def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        async with self.http.get(self.pods_path(namespace, name)) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            return await response.json()

    async def create_pod(self, body: dict[str, Any]) -> None:
        path = self.pods_path(body["metadata"]["namespace"])
        async with self.http.post(path, json=body) as response:
            response.raise_for_status()

    async def set_pod_status(self, namespace: str, name: str, status: dict[str, Any]) -> None:
        """What a kubelet does: merge-patch the Pod's status subresource."""
        async with self.http.patch(
            self.pods_path(namespace, name) + "/status",
            json={"status": status},
            headers={"Content-Type": "application/merge-patch+json"},
        ) as response:
            response.raise_for_status()

    async def delete_pod(self, namespace: str, name: str) -> None:
        async with self.http.delete(self.pods_path(namespace, name)) as response:
            response.raise_for_status()


def terminated(phase: str, exit_code: int, container: str = "worker") -> dict[str, Any]:
    """A Pod status whose container ended with ``exit_code``."""
    return {
        "phase": phase,
        "containerStatuses": [
            {"name": container, "state": {"terminated": {"exitCode": exit_code}}}
        ],
    }


@contextlib.asynccontextmanager
async def kubernetes_api() -> AsyncIterator[EmulatedCluster]:
    """Serve a fresh emulator for the duration of the block."""
    async with kmock.KubernetesEmulator() as emulator, kmock.Server(emulator) as server:
        emulator.resources.load_bundled()
        url = str(server.url).rstrip("/")
        async with aiohttp.ClientSession(base_url=url) as http:
            yield EmulatedCluster(emulator, url, http)
