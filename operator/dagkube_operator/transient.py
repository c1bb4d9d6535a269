"""Which errors pass by themselves (the API server or Redis busy, restarting or unreachable),
and how long to wait before trying again. Everything else ends the Workflow ``Failed``."""

from __future__ import annotations

import aiohttp
import redis.exceptions
from kubernetes_asyncio import client

from dagkube.errors import DagkubeError

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 30.0
# Answers of the API server that a later request may not get: throttled, overloaded,
# unavailable, a conflict of versions, and permissions an administrator may restore (a Role
# edited meanwhile). A 400, 413 or 422 comes back the same however often it is asked.
TRANSIENT_HTTP = frozenset({401, 403, 408, 409, 429})
# Redis errors that say "not now": loading its data, out of memory (noeviction), a replica.
TRANSIENT_REDIS_PREFIXES = ("LOADING", "OOM", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")


class StatusNotWritten(DagkubeError):
    """The API server did not take a status patch (the ApiException is the cause)."""


def backoff_delay_s(
    attempt: int, *, first_s: float = FIRST_DELAY_S, cap_s: float = MAX_DELAY_S
) -> float:
    """Seconds to wait before retry number ``attempt`` (0 first): doubling from ``first_s``,
    at most ``cap_s``."""
    return min(cap_s, first_s * 2.0 ** min(max(attempt, 0), 32))


def is_transient(exc: BaseException) -> bool:
    """True for an error a retry may not meet again: a 5xx, 429 (and the others of
    TRANSIENT_HTTP) from the API server, a connection that failed or timed out, Redis
    loading or full. The error and its causes (``raise ... from``) are looked at."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, client.ApiException):
            status = int(seen.status or 0)
            return status == 0 or status >= 500 or status in TRANSIENT_HTTP
        if isinstance(seen, redis.exceptions.ResponseError):
            return str(seen).startswith(TRANSIENT_REDIS_PREFIXES)
        if isinstance(
            seen,
            ConnectionError
            | TimeoutError
            | aiohttp.ClientConnectionError
            | aiohttp.ServerTimeoutError
            | redis.exceptions.ConnectionError
            | redis.exceptions.TimeoutError,
        ):
            return True
        seen = seen.__cause__
    return False
