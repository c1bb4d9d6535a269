"""Plain-JSON calls to the API server over kubernetes-asyncio's transport (its TLS setup from a
kubeconfig, its aiohttp pool): the agent works on the objects as the API sends them, dicts with
the server's field names, and watches read the event stream line by line."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from kubernetes_asyncio import config
from kubernetes_asyncio.client import ApiClient

log = logging.getLogger("localcluster.agent")


class ApiError(Exception):
    def __init__(self, status: int, body: str, what: str) -> None:
        super().__init__(f"{what}: {status} {body[:300]}")
        self.status = status
        self.body = body


class Api:
    """One identity (a kubeconfig) talking to the API server."""

    def __init__(self, client: ApiClient) -> None:
        self.client = client
        self.host = str(client.configuration.host)

    @classmethod
    async def from_kubeconfig(cls, path: str) -> Api:
        client = await config.new_client_from_config(config_file=path)
        return cls(client)

    async def close(self) -> None:
        await self.client.close()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        content_type: str = "application/json",
        timeout_s: float = 30.0,
    ) -> Any:
        response = await self.client.rest_client.request(
            method,
            self.host + path,
            query_params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Content-Type": content_type, "Accept": "application/json"},
            body=body,
            _preload_content=False,
            _request_timeout=timeout_s,
        )
        async with response:
            text = await response.text()
            if not 200 <= response.status < 300:
                raise ApiError(response.status, text, f"{method} {path}")
            return json.loads(text) if text else None

    async def get(self, path: str, **params: Any) -> Any:
        return await self.request("GET", path, params=params)

    async def create(self, path: str, body: dict) -> Any:
        return await self.request("POST", path, body=body)

    async def patch(self, path: str, body: dict, *, strategic: bool = True) -> Any:
        kind = "strategic-merge-patch" if strategic else "merge-patch"
        return await self.request("PATCH", path, body=body, content_type=f"application/{kind}+json")

    async def delete(self, path: str, body: dict | None = None) -> Any:
        try:
            return await self.request("DELETE", path, body=body)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def watch(
        self, path: str, *, resource_version: str, timeout_s: int = 240, **params: Any
    ) -> AsyncIterator[dict]:
        """The events of one watch request (ends when the server closes it)."""
        query = {
            **{k: v for k, v in params.items() if v is not None},
            "watch": "true",
            "allowWatchBookmarks": "true",
            "resourceVersion": resource_version,
            "timeoutSeconds": str(timeout_s),
        }
        response = await self.client.rest_client.request(
            "GET",
            self.host + path,
            query_params=query,
            headers={"Accept": "application/json"},
            _preload_content=False,
            _request_timeout=aiohttp.ClientTimeout(total=None, sock_read=timeout_s + 30),
        )
        async with response:
            if response.status != 200:
                raise ApiError(response.status, await response.text(), f"WATCH {path}")
            async for line in response.content:
                if line.strip():
                    yield json.loads(line)


async def informer(
    api: Api,
    path: str,
    on_event: Any,
    *,
    stop: asyncio.Event,
    **params: Any,
) -> None:
    """List, then watch ``path`` forever (until ``stop``): ``on_event(type, object)`` for each
    object listed ("SYNC" with the whole list first) and each change. Survives expired
    resource versions and broken connections by listing again."""
    while not stop.is_set():
        try:
            listed = await api.get(path, **params)
            await on_event("SYNC", listed.get("items") or [])
            version = listed["metadata"]["resourceVersion"]
            while not stop.is_set():
                async for event in api.watch(path, resource_version=version, **params):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR":
                        raise ApiError(int(obj.get("code") or 500), json.dumps(obj), "watch")
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if kind != "BOOKMARK":
                        await on_event(kind, obj)
        except asyncio.CancelledError:
            raise
        except ApiError as exc:
            if exc.status != 410:  # 410 Gone: the version expired, list again
                log.warning("watch %s: %s; listing again", path, exc)
                await asyncio.sleep(1.0)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            log.warning("watch %s: %s; listing again", path, exc)
            await asyncio.sleep(1.0)
