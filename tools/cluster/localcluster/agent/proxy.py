"""A TCP relay from the bridge address to the API server on 127.0.0.1.

The API server listens on loopback only, which a Pod's network namespace cannot reach. The
node agent relays ``<bridge address>:<port>`` to ``127.0.0.1:<port>`` (TLS passes through
untouched), and the API server advertises the bridge address, so the ``kubernetes`` Service's
endpoint, and with it kube-proxy's rule for its ClusterIP, leads here: in-cluster clients use
``KUBERNETES_SERVICE_HOST`` as on any cluster. (k3s agents run a client-side relay like it.)
"""

from __future__ import annotations

import asyncio
import contextlib


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()


async def serve(listen_host: str, port: int, target_host: str = "127.0.0.1") -> asyncio.Server:
    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(target_host, port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    return await asyncio.start_server(relay, listen_host, port)
