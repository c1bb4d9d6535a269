"""An object store for large outputs: a local directory (``file:///path``) or an S3 bucket
(``s3://bucket/prefix?endpoint_url=…&region=…``).

An output of at least ``threshold_bytes`` that would be written under its own Redis key
(:func:`dagkube.store.keys.own_key`) is put here instead, as ``<namespace>/<run id>/<task id>``
below the store's prefix, and Redis gets a small reference (:data:`OBJECT_REF` + that name),
set, adopted and expired like the output it stands for (lua/prelude.lua adopt_output). Readers
resolve references transparently (:class:`dagkube.store.connection.BulkReader`). Redis then
never holds, copies or writes to its append-only file the large values, and S3 lets Pods that
share no directory exchange them.

Objects outlive Redis's TTLs: a run's objects are deleted when its driver drops its data
(:func:`dagkube.store.cleanup.drop_run_data`), when a completion finds its run gone, and by
:func:`sweep_orphans` for runs whose Redis keys are gone (docs/architecture.md, "Large outputs
and the object store", says what can still leak).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import mmap
import os
import re
import resource
import shutil
import threading
import uuid
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from dagkube.errors import DagkubeError
from dagkube.store.frames import Frames, Serialized, joined
from dagkube.store.keys import RunKeys, namespace_of

log = logging.getLogger("dagkube.runtime")

STORE_URL_ENV = "DAGKUBE_OBJECT_STORE_URL"
THRESHOLD_ENV = "DAGKUBE_OBJECT_THRESHOLD_BYTES"
DEFAULT_THRESHOLD_BYTES = 1024 * 1024
# What a reference stored in Redis in place of an output begins with: a serialized value is a
# pickle (starts with the PROTO opcode 0x80) or an out-of-band frame (starts with b"DKB5",
# dagkube.runtime.inputs), never with this.
OBJECT_REF = b"DKOBJ1:"
# The namespace part of the object names of local runs (ids without a namespace): a Kubernetes
# namespace name has no '_', so it names no real namespace.
LOCAL_NAMESPACE = "_local"
_UNSAFE = re.compile(rb"[^A-Za-z0-9-]")

Buffers = bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview]


class ObjectStoreError(DagkubeError):
    """The object store cannot be used: bad URL, missing bucket, bad credentials, no answer."""


def _safe(part: str) -> str:
    """A name part with only letters, digits and '-', every other byte as '_' + two hex digits
    (reversible, and safe as an S3 key part and a file name: no '/', no '.' or '..')."""
    return _UNSAFE.sub(lambda m: f"_{m.group()[0]:02x}".encode(), part.encode()).decode()


def run_prefix(run_id: str) -> str:
    """The name every object of a run begins with: ``<namespace>/<run id>/``."""
    namespace = namespace_of(run_id)
    return f"{_safe(namespace) if namespace else LOCAL_NAMESPACE}/{_safe(run_id)}/"


def object_name(run_id: str, task_id: str) -> str:
    """A task's output object, relative to the store's prefix."""
    return run_prefix(run_id) + _safe(task_id)


def reference(name: str) -> bytes:
    return OBJECT_REF + name.encode()


def referenced(value: Any) -> str | None:
    """The object name a value stored in Redis refers to, None for a value itself."""
    if isinstance(value, bytes | bytearray) and value.startswith(OBJECT_REF):
        return bytes(value[len(OBJECT_REF) :]).decode()
    return None


class _Mappings:
    """This process's live object mappings, counted as they are made and freed (no listing of
    its descriptors on every read): each keeps a duplicate of its file's descriptor until
    its value is freed, so mappings stop at half the descriptor limit (a fan-in of thousands
    of large inputs must not leave no descriptor for a socket)."""

    def __init__(self) -> None:
        self.live = 0
        self._lock = threading.Lock()

    def map(self, fd: int, size: int) -> mmap.mmap | None:
        """``fd`` mapped copy-on-write, None if this process has no descriptor to spare."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        with self._lock:
            if soft != resource.RLIM_INFINITY and self.live >= soft // 2:
                return None
            self.live += 1
        try:
            mapped = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        except BaseException:
            self._freed()
            raise
        weakref.finalize(mapped, self._freed)
        return mapped

    def _freed(self) -> None:
        with self._lock:
            self.live -= 1


_MAPPINGS = _Mappings()


def _parts(data: Buffers) -> list[memoryview]:
    if isinstance(data, bytes | bytearray | memoryview):
        return [memoryview(data).cast("B")]
    return [memoryview(part).cast("B") for part in data]


class ObjectStore(abc.ABC):
    """Put, get and delete a run's objects (``name``: from :func:`object_name`). Methods block:
    callers run them in an I/O thread."""

    def __init__(self, url: str, threshold_bytes: int) -> None:
        if threshold_bytes < 1:
            raise ObjectStoreError(
                f"object store threshold {threshold_bytes} must be a number of bytes >= 1"
            )
        self.url = url
        self.threshold_bytes = threshold_bytes

    @abc.abstractmethod
    def put(self, name: str, data: Buffers) -> None:
        """Write the object whole (bytes, or buffers written one after the other)."""

    @abc.abstractmethod
    def get(self, name: str) -> bytes | None:
        """The object's bytes (any bytes-like object: :func:`deserialize` reads it), None if
        it does not exist."""

    @abc.abstractmethod
    def delete(self, name: str) -> None:
        """One object (absent: nothing to do)."""

    @abc.abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Every object whose name begins with ``prefix``, a run's (none: nothing to do)."""

    @abc.abstractmethod
    def run_prefixes(self) -> Iterator[tuple[str, str]]:
        """(encoded run id, its prefix) of every run that has objects."""

    @abc.abstractmethod
    def check(self) -> None:
        """Raise ObjectStoreError if the store cannot be used (said once, at start-up)."""

    def delete_run(self, run_id: str) -> None:
        self.delete_prefix(run_prefix(run_id))


class DirectoryStore(ObjectStore):
    """Objects as files under a directory. A file is written under a temporary name, then
    renamed (``os.replace``): a reader never sees half an object. Not fsynced: outputs are
    intermediate data that the run recomputes or fails without."""

    def __init__(self, url: str, root: Path, threshold_bytes: int) -> None:
        super().__init__(url, threshold_bytes)
        self.root = root

    def check(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ObjectStoreError(
                f"object store {self.url}: cannot use the directory: {exc}"
            ) from None
        if not os.access(self.root, os.W_OK | os.X_OK):
            raise ObjectStoreError(f"object store {self.url}: the directory is not writable")

    def put(self, name: str, data: Buffers) -> None:
        path = self.root / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb", buffering=0) as file:
                for part in _parts(data):
                    while part:  # a raw write may take less than it was given
                        part = part[file.write(part) :]
            os.replace(temporary, path)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def get(self, name: str) -> bytes | None:
        """The file mapped copy-on-write (private: writeable, never written back), so a value
        costs no copy and no fresh pages until a task changes it (15 x 16 MiB: 0.3 s read
        and unpickled, 2 ms mapped); read whole where no mapping can be made."""
        try:
            fd = os.open(self.root / name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            size = os.fstat(fd).st_size
            if size:
                with contextlib.suppress(OSError):  # no descriptor or address space left
                    mapped = _MAPPINGS.map(fd, size)
                    if mapped is not None:
                        return mapped  # type: ignore[return-value]
            value = bytearray(size)  # one allocation, filled in place
            view, done = memoryview(value), 0
            while done < size:
                read = os.readv(fd, [view[done:]])
                if not read:
                    raise ObjectStoreError(f"object {name} in {self.url} shrank while read")
                done += read
            return value  # type: ignore[return-value]  # bytes-like: what deserialize accepts
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(self.root / prefix)

    def run_prefixes(self) -> Iterator[tuple[str, str]]:
        if not self.root.is_dir():
            return
        for namespace in self.root.iterdir():
            if namespace.is_dir():
                for run in namespace.iterdir():
                    yield run.name, f"{namespace.name}/{run.name}/"


def decode_run_id(encoded: str) -> str:
    """The run id of a prefix part (:func:`_safe` reversed)."""
    raw = re.sub(rb"_([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), encoded.encode())
    return raw.decode()


def open_store(url: str, threshold_bytes: int = DEFAULT_THRESHOLD_BYTES) -> ObjectStore:
    """The object store of ``url`` (``file:///absolute/dir`` or ``s3://bucket[/prefix]`` with
    optional ``endpoint_url`` and ``region`` query parameters), checked to be usable."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or parts.query or not parts.path.startswith("/"):
            raise ObjectStoreError(
                f"object store {url!r}: a directory URL is file:///absolute/path "
                "(no host, no query)"
            )
        store: ObjectStore = DirectoryStore(url, Path(unquote(parts.path)), threshold_bytes)
    elif parts.scheme == "s3":
        from dagkube.store.objects_s3 import S3Store  # boto3 is an optional dependency

        store = S3Store(url, parts.netloc, parts.path.strip("/"), _query(url), threshold_bytes)
    else:
        raise ObjectStoreError(
            f"object store {url!r}: unsupported scheme {parts.scheme!r}; use file:///dir or "
            "s3://bucket/prefix?endpoint_url=…&region=…"
        )
    store.check()
    return store


def _query(url: str) -> dict[str, str]:
    query = parse_qs(urlsplit(url).query, keep_blank_values=True, strict_parsing=False)
    unknown = sorted(set(query) - {"endpoint_url", "region"})
    if unknown:
        raise ObjectStoreError(
            f"object store {url!r}: unknown parameter(s) {', '.join(unknown)}; "
            "accepted: endpoint_url, region"
        )
    return {key: values[-1] for key, values in query.items()}


def store_from_env(environ: Mapping[str, str] | None = None) -> ObjectStore | None:
    """The store ``DAGKUBE_OBJECT_STORE_URL`` names (None: unset, empty or ``off``), with the
    threshold of ``DAGKUBE_OBJECT_THRESHOLD_BYTES`` (default 1 MiB)."""
    environ = os.environ if environ is None else environ
    url = environ.get(STORE_URL_ENV) or ""
    if not url or url == "off":
        return None
    return open_store(url, parse_threshold(environ.get(THRESHOLD_ENV) or ""))


def parse_threshold(text: str) -> int:
    if not text:
        return DEFAULT_THRESHOLD_BYTES
    try:
        threshold = int(text)
    except ValueError:
        threshold = 0
    if threshold < 1:
        raise ObjectStoreError(f"{THRESHOLD_ENV}={text!r} must be a whole number of bytes >= 1")
    return threshold


# ------------------------------------------------------------------ the data plane's use
def spill(
    store: ObjectStore, run_id: str, outputs: Mapping[str, Serialized]
) -> tuple[dict[str, bytes], list[str]]:
    """``outputs`` (task id -> serialized output) with each one of at least the threshold put
    in ``store`` and replaced by its reference; and the names put."""
    kept: dict[str, bytes] = {}
    names: list[str] = []
    for task_id, output in outputs.items():
        if len(output) < store.threshold_bytes:
            kept[task_id] = joined(output)
            continue
        name = object_name(run_id, task_id)
        store.put(name, output.parts if isinstance(output, Frames) else output)
        names.append(name)
        kept[task_id] = reference(name)
    return kept, names


def resolve(store: ObjectStore | None, values: list[list[bytes | None]]) -> None:
    """Replace, in place, each reference among ``values`` by its object's bytes (None if the
    object is gone: a lost output, which the reader recomputes or reports)."""
    for row in values:
        for at, value in enumerate(row):
            name = referenced(value)
            if name is None:
                continue
            if store is None:
                raise ObjectStoreError(
                    f"an output lies in an object store ({name}), but this process has none: "
                    f"set {STORE_URL_ENV} as its workers have it"
                )
            row[at] = store.get(name)
            if row[at] is None:
                log.warning("object %s is missing from %s", name, store.url)


def delete_names(store: ObjectStore, names: Sequence[str]) -> None:
    for name in names:
        store.delete(name)


async def sweep_orphans(redis: Any, store: ObjectStore) -> list[str]:
    """Delete the objects of runs whose Redis keys are gone (expired, deleted, a lost Redis):
    their references are gone too. Returns the run ids swept."""
    prefixes = await asyncio.to_thread(lambda: list(store.run_prefixes()))
    swept = []
    for encoded, prefix in prefixes:
        run_id = decode_run_id(encoded)
        if not await redis.exists(RunKeys(run_id).meta):
            await asyncio.to_thread(store.delete_prefix, prefix)
            swept.append(run_id)
    return swept
