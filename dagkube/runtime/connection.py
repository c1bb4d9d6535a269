"""Opening Redis connections from a URL, with one clear error line when that fails."""

from __future__ import annotations

import re

import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from dagkube.errors import RedisUnavailable


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


async def connect(url: str, *, timeout_s: float = 5.0) -> aioredis.Redis:
    """Connect and PING; raise :class:`RedisUnavailable` naming the server and the cause."""
    try:
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            # Blocking pops wait longer than any fixed read timeout (redis-py 8 defaults to
            # 5 s); dead peers are found by TCP keepalive and health checks instead.
            socket_timeout=None,
            socket_keepalive=True,
            health_check_interval=30,
            decode_responses=False,
        )
    except ValueError as exc:
        raise RedisUnavailable(f"Redis URL {redact(url)!r} is invalid: {exc}") from None
    try:
        await client.ping()
    except redis_errors.AuthenticationError as exc:
        await client.aclose()
        raise RedisUnavailable(f"Redis at {redact(url)} refused the credentials: {exc}") from None
    except redis_errors.ResponseError as exc:
        await client.aclose()
        if "NOAUTH" in str(exc) or "WRONGPASS" in str(exc):
            raise RedisUnavailable(
                f"Redis at {redact(url)} needs a valid password (put it in the URL): {exc}"
            ) from None
        raise RedisUnavailable(f"Redis at {redact(url)} answered PING with: {exc}") from None
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        await client.aclose()
        raise RedisUnavailable(f"Cannot reach Redis at {redact(url)}: {exc}") from None
    return client
