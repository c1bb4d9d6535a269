"""Container probes as a kubelet runs them: exec (inside the container's namespaces, as its
user, with its environment), httpGet and tcpSocket (to the Pod's address)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp


def port_number(container: dict, port: Any) -> int:
    if isinstance(port, int) or (isinstance(port, str) and port.isdigit()):
        return int(port)
    for declared in container.get("ports") or []:
        if declared.get("name") == port:
            return int(declared["containerPort"])
    raise ValueError(f"probe port {port!r} is not a port of container {container['name']}")


async def run_probe(
    probe: dict,
    *,
    container: dict,
    pod_ip: str,
    pid: int,
    env: dict[str, str],
    uid: int | None,
    gid: int | None,
) -> bool:
    """One attempt of ``probe``: True if it succeeded within its timeout."""
    timeout_s = float(probe.get("timeoutSeconds") or 1)
    try:
        async with asyncio.timeout(timeout_s):
            if "exec" in probe:
                command = list(probe["exec"].get("command") or [])
                enter = ["nsenter", "-t", str(pid), "-m", "-n"]
                if uid is not None:
                    enter += ["-S", str(uid), "-G", str(gid if gid is not None else uid)]
                argv = [*enter, "--", "env", "-i", *(f"{k}={v}" for k, v in env.items()), *command]
                process = await asyncio.create_subprocess_exec(
                    *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
                )
                try:
                    return await process.wait() == 0
                finally:
                    if process.returncode is None:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                        await process.wait()
            if "httpGet" in probe:
                spec = probe["httpGet"]
                port = port_number(container, spec.get("port"))
                host = spec.get("host") or pod_ip
                scheme = (spec.get("scheme") or "HTTP").lower()
                url = f"{scheme}://{host}:{port}{spec.get('path') or '/'}"
                headers = {h["name"]: h["value"] for h in spec.get("httpHeaders") or []}
                async with (
                    aiohttp.ClientSession() as session,
                    session.get(url, headers=headers, ssl=False) as response,
                ):
                    return 200 <= response.status < 400
            if "tcpSocket" in probe:
                port = port_number(container, probe["tcpSocket"].get("port"))
                _, writer = await asyncio.open_connection(
                    probe["tcpSocket"].get("host") or pod_ip, port
                )
                writer.close()
                return True
            if "grpc" in probe:
                return False
    except (TimeoutError, OSError, aiohttp.ClientError, ValueError):
        return False
    return False
