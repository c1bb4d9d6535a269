"""Opening Redis connections from a URL, with one clear error line when that fails, and
:class:`ServerWatch`: what a process does when its server goes away or restarts."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio as aioredis
from redis import exceptions as redis_errors
from redis._parsers import Encoder
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import AbstractBackoff, ExponentialBackoff
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.retry import Retry as SyncRetry
from redis.utils import HIREDIS_AVAILABLE

from dagkube.errors import RedisUnavailable
from dagkube.store.calls import LengthsCall
from dagkube.store.frames import Serialized, joined
from dagkube.store.keys import own_key
from dagkube.store.objects import ObjectStore, resolve
from dagkube.store.scripts import SOURCES

log = logging.getLogger("dagkube.runtime")
T = TypeVar("T")

# Every blocking command (BLPOP, BLMOVE) waits at most MAX_BLOCK_S per call and its callers
# loop, so one finite read timeout covers every command: a stopped or hung server is noticed
# within SOCKET_TIMEOUT_S (then RedisUnavailable), and `--timeout` and Ctrl-C keep working.
MAX_BLOCK_S = 5.0
SOCKET_TIMEOUT_S = MAX_BLOCK_S + 5.0
# Redis before 7.0 truncates a blocking command's timeout to whole milliseconds (after a
# decimal-to-binary conversion, so "0.001" can become 0), and 0 means "wait forever": a
# deadline's last remainder is sent as at least 10 ms.
MIN_BLOCK_S = 0.01
CONNECT_TIMEOUT_S = 5.0
HEALTH_CHECK_S = 30
# A server that stops answering or refuses connections is retried (with backoff) this long
# after the first failure before a watched client gives up: a pause, a network blip or a
# supervisor restarting the same server goes unnoticed, and a server gone for good is given
# up on within SOCKET_TIMEOUT_S + RECONNECT_GRACE_S + SOCKET_TIMEOUT_S (35 s) at worst.
RECONNECT_GRACE_S = 15.0


def block_timeout(seconds: float) -> float:
    """The timeout to send with BLPOP/BLMOVE for a wait of ``seconds`` (> 0): at most
    MAX_BLOCK_S, at least MIN_BLOCK_S, so a short remainder never becomes "forever"."""
    return min(MAX_BLOCK_S, max(MIN_BLOCK_S, seconds))


def _default_user(url: str) -> bool:
    """The URL logs in as Redis's default user (no user name, or "default")."""
    return urlsplit(url).username in (None, "", "default")


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"//([^:/@]*):[^@/]*@", r"//\1:***@", url)


def with_ca_file(url: str, ca_file: str) -> str:
    """A rediss:// ``url`` whose clients verify the server against the CA in ``ca_file`` (its
    ``ssl_ca_certs``, which redis-py takes from the query), other query arguments kept."""
    parts = urlsplit(url)
    if parts.scheme != "rediss":
        raise ValueError(
            f"Redis URL {redact(url)!r} does not use TLS: a CA file needs a rediss:// URL"
        )
    query = [(name, value) for name, value in parse_qsl(parts.query) if name != "ssl_ca_certs"]
    query.append(("ssl_ca_certs", ca_file))
    return urlunsplit(parts._replace(query=urlencode(query, safe="/")))


class ServerReplaced(redis_errors.RedisError):
    """The server at the URL is not the one this process began with (its ``run_id`` changed):
    it restarted, and what it was told after its last fsync may be lost. Never retried."""


class ServerWatch:
    """One process's Redis server, followed through outages: driver, scaler and worker (and
    the operator) make their clients here and share the verdict.

    A lost connection (refused, reset, a read timeout) is retried with backoff for up to
    ``grace_s`` after the first failure, then given up for good (:attr:`lost`; later calls
    fail at once, so clean-up does not wait again). Every new connection asks the server its
    ``run_id`` (``INFO server``): the same one, the same server, so work goes on; another, a
    restart, and :class:`ServerReplaced` is raised (:attr:`replaced`), since what the process
    knows may be ahead of what the restarted server kept. Clients made without a watch keep
    redis-py's default: no retries, no identity check.

    ``identify``: ask for the ``run_id``. By default only as Redis's default user (a URL
    without a user name): the ACL users of :mod:`dagkube.store.acl` may not send INFO, and
    a refused command is an error in the ACL log. Without it outages are still ridden out,
    but a restart goes unnoticed.
    """

    def __init__(
        self, url: str, grace_s: float = RECONNECT_GRACE_S, *, identify: bool | None = None
    ) -> None:
        self.url = url
        self.grace_s = grace_s
        self.identify = identify if identify is not None else _default_user(url)
        self.run_id: str | None = None  # the server's, once a connection was made
        self.replaced = False
        self.lost = False

    def __deepcopy__(self, memo: dict) -> ServerWatch:
        return self  # redis-py copies a client's Retry per connection: they share this watch

    @property
    def gone(self) -> bool:
        """The server restarted or was given up on: nothing more to say to it."""
        return self.replaced or self.lost

    async def connect(self) -> aioredis.Redis:
        """An asyncio client that follows this watch (see :func:`connect`)."""
        return await connect(self.url, watch=self)

    def sync_client(self) -> redis.Redis:
        """A synchronous client that follows this watch (see :func:`sync_client`)."""
        return sync_client(self.url, watch=self)

    def describe(self, during: str = "") -> str:
        """What happened to the server, in words, for a message or a log line (``during``:
        e.g. "during run X")."""
        when = f" {during}" if during else ""
        if self.replaced:
            return (
                f"Redis at {redact(self.url)} restarted{when} (state written after its last "
                "fsync may be lost)"
            )
        return f"Redis at {redact(self.url)} did not answer for {self.grace_s:g}s{when}"

    def _check(self, info: bytes | str | dict) -> None:
        if isinstance(info, dict):
            run_id = str(info.get("run_id", ""))
        else:
            text = info.decode() if isinstance(info, bytes) else info
            found = re.search(r"^run_id:(\w+)", text, re.M)
            run_id = found.group(1) if found else ""
        if self.run_id is None:
            self.run_id = run_id
        elif run_id != self.run_id:
            self.replaced = True
            raise ServerReplaced(f"{self.describe()}: server {self.run_id} is now {run_id}")

    def _unchecked(self) -> None:
        if self.run_id is None:  # outages are still ridden out; restarts cannot be told
            self.run_id = ""
            log.warning(
                "the Redis user may not send INFO: restarts of %s go unnoticed", redact(self.url)
            )

    async def _on_connect(self, conn: Any) -> None:
        await conn.on_connect()
        if self.replaced:  # a restart is final: no connection to the new server
            raise ServerReplaced(self.describe())
        if not self.identify:
            self.run_id = ""
            return
        try:
            await conn.send_command("INFO", "server")
            self._check(await conn.read_response())
        except redis_errors.NoPermissionError:
            self._unchecked()

    def _on_connect_sync(self, conn: Any) -> None:
        conn.on_connect()
        if self.replaced:
            raise ServerReplaced(self.describe())
        if not self.identify:
            self.run_id = ""
            return
        try:
            conn.send_command("INFO", "server")
            self._check(conn.read_response())
        except redis_errors.NoPermissionError:
            self._unchecked()

    def _left_s(self, since: float | None) -> float:
        """Seconds of grace left for an outage that began at ``since`` (<= 0: give up)."""
        if self.gone or self.run_id is None:  # never reached: no grace, say so at once
            return 0.0
        left = (since or time.monotonic()) + self.grace_s - time.monotonic()
        if left <= 0:
            self.lost = True
            log.warning("%s: giving up", self.describe())
        return left


_BACKOFF_CAP_S = 2.0
_RETRIES = 1 << 30  # bounded by the grace, not by a count (redis-py reads it for its metrics)


class _Grace:
    """What the asyncio and the synchronous retry share: one outage's start, bounded by the
    watch's grace. One per connection (redis-py copies it): the command and the reconnection
    inside it share the outage's start, so nesting does not extend the grace."""

    watch: ServerWatch
    _backoff: AbstractBackoff

    def _follow(self, watch: ServerWatch) -> None:
        self.watch = watch
        self.outage_since: float | None = None
        self.depth = 0  # a command's retry holds its (re)connection's: only the outer one ends

    def _begin(self) -> None:
        self._backoff.reset()
        self.depth += 1

    def _end(self) -> None:
        self.depth -= 1
        if not self.depth:
            self.outage_since = None

    def _pause_s(self, failures: int) -> float | None:
        """How long to wait before the next attempt; None: the grace is over, give up."""
        self.outage_since = self.outage_since or time.monotonic()
        left = self.watch._left_s(self.outage_since)
        return min(self._backoff.compute(failures), left) if left > 0 else None


class _GraceRetry(_Grace, AsyncRetry):
    """redis-py's retry of a command or connection (asyncio), bounded by the watch's grace."""

    def __init__(self, watch: ServerWatch) -> None:
        super().__init__(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.1), _RETRIES)
        self._follow(watch)

    async def call_with_retry(
        self,
        do: Callable[[], Awaitable[T]],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._begin()
        failures = 0
        try:
            while True:
                try:
                    return await do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    await (fail(error, failures) if with_failure_count else fail(error))
                    pause = self._pause_s(failures)
                    if pause is None:
                        raise
                    await asyncio.sleep(pause)
        finally:
            self._end()


class _SyncGraceRetry(_Grace, SyncRetry):
    """:class:`_GraceRetry` for the synchronous client (BulkReader)."""

    def __init__(self, watch: ServerWatch) -> None:
        super().__init__(ExponentialBackoff(cap=_BACKOFF_CAP_S, base=0.1), _RETRIES)
        self._follow(watch)

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        self._begin()
        failures = 0
        try:
            while True:
                try:
                    return do()
                except self._supported_errors as error:
                    if is_retryable and not is_retryable(error):
                        raise
                    failures += 1
                    fail(error, failures) if with_failure_count else fail(error)
                    pause = self._pause_s(failures)
                    if pause is None:
                        raise
                    time.sleep(pause)
        finally:
            self._end()


# An argument this large is sent as it is, never copied into a packed command.
LARGE_ARGUMENT_BYTES = 64 * 1024
# Values read in one round trip at most (one larger value is read alone): Redis copies a
# reply whole into its output buffers before sending it, and both it and the client slow
# down on replies of hundreds of MB (measured here, eight 16 MiB fields: 662 ms in one
# HMGET against about 220 ms one by one).
READ_BATCH_BYTES = 8 * 2**20
_CHUNK_CUTOFF_BYTES = 6000  # redis-py's: smaller pieces are joined before a send


class _Packer:
    """Packs the synchronous client's commands. hiredis packs a command into one string,
    copying every argument: measured here, 107 ms for a 16 MiB one, three times what sending
    it takes. A command with a large argument is packed by redis-py's Python packer instead,
    which leaves the argument as it is (one ``sendall`` of the caller's bytes); every other
    command keeps hiredis's speed."""

    def __init__(self) -> None:
        self._chunking = PythonRespSerializer(
            _CHUNK_CUTOFF_BYTES, Encoder("utf-8", "strict", False).encode
        )
        self._compact = HiredisRespSerializer() if HIREDIS_AVAILABLE else self._chunking

    def pack(self, *args: Any) -> list[Any]:
        for arg in args:
            if isinstance(arg, bytes | bytearray | memoryview) and len(arg) > LARGE_ARGUMENT_BYTES:
                return self._chunking.pack(*args)
        return self._compact.pack(*args)


def sync_client(url: str, *, watch: ServerWatch | None = None) -> redis.Redis:
    """A synchronous client with the same timeouts as :func:`connect` (not yet connected;
    raises ValueError for a malformed URL)."""
    followed: dict[str, Any] = {}
    if watch is not None:
        followed = {"retry": _SyncGraceRetry(watch), "redis_connect_func": watch._on_connect_sync}
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=HEALTH_CHECK_S,
        command_packer=_Packer(),
        **followed,
    )


async def connect(
    url: str, *, timeout_s: float = CONNECT_TIMEOUT_S, watch: ServerWatch | None = None
) -> aioredis.Redis:
    """Connect and PING; raise :class:`RedisUnavailable` naming the server and the cause.
    With a ``watch``, the client retries lost connections and checks the server's identity
    (:class:`ServerWatch`)."""
    followed: dict[str, Any] = {}
    if watch is not None:
        followed = {"retry": _GraceRetry(watch), "redis_connect_func": watch._on_connect}
    try:
        client = aioredis.Redis.from_url(
            url,
            socket_connect_timeout=timeout_s,
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_keepalive=True,
            health_check_interval=HEALTH_CHECK_S,
            decode_responses=False,
            **followed,
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
    except ServerReplaced as exc:
        await client.aclose()
        raise RedisUnavailable(str(exc)) from None
    return client


class BulkReader:
    """Reads and writes (possibly large) values on a synchronous connection, in an I/O
    thread: fields of hashes, or, a large one, under its own key (:func:`keys.own_key`).

    redis-py's asyncio client reads large replies about three times slower than its
    synchronous one (measured here: an 8.4 MB HGET took 23 ms against 8 ms) and sends large
    values slower too (its writes join the command into one string: a 16 MiB SET took 90-170
    ms against 35-45 ms from a plain socket); working in a thread also keeps big transfers
    off the event loop.
    """

    def __init__(
        self,
        url: str,
        threads: int = 1,
        *,
        watch: ServerWatch | None = None,
        objects: ObjectStore | None = None,
    ) -> None:
        self._client = sync_client(url, watch=watch)
        self.objects = objects  # where the largest outputs lie (Redis holds references)
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dagkube-io")
        self._scripts: dict[str, Any] = {}  # Lua source -> its registered script

    def _script(self, source: str) -> Any:
        script = self._scripts.get(source)
        if script is None:
            script = self._scripts[source] = self._client.register_script(source)
        return script

    async def open(self) -> None:
        """Connect now (the watch's server check included), not on the first transfer: a
        worker calls it while starting, so its first download or upload is timed like the
        others (a new connection cost 15-20 ms more here, which the transfer model priced
        into the next runs' fetches)."""
        await self.in_io(self._client.ping)

    async def in_io(self, function: Callable[..., T], *args: Any) -> T:
        """``function(*args)`` in the I/O thread (Redis and object store transfers)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, function, *args)

    async def set_then_script(
        self,
        values: list[tuple[str, Serialized]],
        ttl_s: int,
        source: str,
        keys: list[str],
        args: list[Any],
    ) -> Any:
        """One round trip: ``SET key value NX EX ttl_s`` for each (key, value), then the Lua
        script ``source`` (by its SHA, loaded if the server lost it); returns its reply."""
        return await self.in_io(self._set_then_script, values, ttl_s, source, keys, args)

    def _set_then_script(
        self,
        values: list[tuple[str, Serialized]],
        ttl_s: int,
        source: str,
        keys: list[str],
        args: list[Any],
    ) -> Any:
        script = self._script(source)
        with self._client.pipeline(transaction=False) as pipe:
            for key, value in values:
                pipe.set(key, joined(value), nx=True, ex=ttl_s)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            try:
                return pipe.execute()[-1]
            except redis_errors.NoScriptError:  # a restarted Redis; the SETs were applied
                return script(keys=keys, args=args)

    async def hmget_many(self, requests: list[tuple[str, list[str]]]) -> list[list[bytes | None]]:
        """For each (hash key, fields), the fields' values (None if absent), each from its
        hash or, a large one, from its own key (:func:`keys.own_key`): one round trip for one
        field; for more, their lengths and places first, then the values in batches of at most
        :data:`READ_BATCH_BYTES` (a larger value alone), a round trip each."""
        return await self.in_io(self._fetch, requests)

    def _fetch(self, requests: list[tuple[str, list[str]]]) -> list[list[bytes | None]]:
        wanted = [(at, key, field) for at, (key, fields) in enumerate(requests) for field in fields]
        values: list[list[bytes | None]] = [[] for _ in requests]
        if len(wanted) <= 1:
            for at, key, field in wanted:
                values[at].append(self._read_one(key, field))
        else:
            self._read_many(wanted, values)
        resolve(self.objects, values)  # references to the object store: their objects
        return values

    def _read_many(self, wanted: list[tuple[int, str, str]], values: list[list[Any]]) -> None:
        call = LengthsCall([(key, field) for _, key, field in wanted])
        script = self._script(SOURCES[call.script])
        found = call.decode(script(keys=call.keys(), args=call.encode()))
        batch: list[tuple[int, str, str, bool]] = []
        batch_bytes = 0
        for item, length, apart in zip(wanted, found.lengths, found.apart, strict=True):
            if batch and batch_bytes + length > READ_BATCH_BYTES:
                self._read_batch(batch, values)
                batch, batch_bytes = [], 0
            batch.append((*item, apart))
            batch_bytes += length
        self._read_batch(batch, values)

    def _read_one(self, key: str, field: str) -> bytes | None:
        """One value, from both its places at once (one round trip, no lengths asked)."""
        with self._client.pipeline(transaction=False) as pipe:
            pipe.hget(key, field)
            pipe.get(own_key(key, field))
            in_hash, apart = pipe.execute()
        return in_hash if in_hash is not None else apart

    def _read_batch(self, batch: list[tuple[int, str, str, bool]], values: list[list[Any]]) -> None:
        """One round trip for a batch of (request index, hash key, field, under its own key),
        in request order: the values appended to ``values``. Consecutive fields of a request
        that lie in their hash are read by one HMGET, each one under its own key by a GET."""
        groups: list[tuple[int, str, list[str]]] = []  # (request, key, fields); [] for a GET
        for at, key, field, apart in batch:
            if apart:
                groups.append((at, own_key(key, field), []))
            elif groups and groups[-1][0] == at and groups[-1][2]:
                groups[-1][2].append(field)
            else:
                groups.append((at, key, [field]))
        with self._client.pipeline(transaction=False) as pipe:
            for _, key, fields in groups:
                if fields:
                    pipe.hmget(key, fields)
                else:
                    pipe.get(key)
            replies = pipe.execute()
        for (at, _, fields), reply in zip(groups, replies, strict=True):
            values[at].extend(reply if fields else [reply])

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._client.close()
