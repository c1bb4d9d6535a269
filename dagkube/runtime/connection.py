"""Opening Redis connections from a URL, with one clear error line when that fails."""

from __future__ import annotations

import asyncio
import re
from concurrent.futures import ThreadPoolExecutor

import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from dagkube.errors import RedisUnavailable

# Every blocking command (BLPOP, BLMOVE) waits at most MAX_BLOCK_S per call and its callers
# loop, so one finite read timeout covers every command: a stopped or hung server is noticed
# within SOCKET_TIMEOUT_S (then RedisUnavailable), and `--timeout` and Ctrl-C keep working.
MAX_BLOCK_S = 5.0
SOCKET_TIMEOUT_S = MAX_BLOCK_S + 5.0
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 30


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def sync_client(url: str) -> redis.Redis:
    """A synchronous client with the same timeouts as :func:`connect` (not yet connected;
    raises ValueError for a malformed URL)."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
    )


async def connect(url: str, *, timeout_s: float = CONNECT_TIMEOUT_S) -> aioredis.Redis:
    """Connect and PING; raise :class:`RedisUnavailable` naming the server and the cause."""
    try:
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=HEALTH_CHECK_S,
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


class BulkReader:
    """Reads (possibly large) hash fields on a synchronous connection, in an I/O thread.

    redis-py's asyncio client reads large replies about three times slower than its
    synchronous one (measured here: an 8.4 MB HGET took 23 ms against 8 ms), and reading in
    a thread also keeps big downloads off the event loop.
    """

    def __init__(self, url: str, threads: int = 1) -> None:
        self._client = sync_client(url)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dagkube-io")

    async def hmget_many(self, requests: list[tuple[str, list[str]]]) -> list[list[bytes | None]]:
        """One round trip: for each (hash key, fields), the fields' values (None if absent)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._fetch, requests)

    def _fetch(self, requests: list[tuple[str, list[str]]]) -> list[list[bytes | None]]:
        with self._client.pipeline(transaction=False) as pipe:
            for key, fields in requests:
                pipe.hmget(key, fields)
            return pipe.execute()

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._client.close()
