"""The S3 object store (:mod:`dagkube.store.objects`), on boto3: ``pip install dagkube[s3]``.

Credentials come from the usual AWS sources (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``,
a profile, an instance or Pod role); the URL names bucket, prefix, and optionally
``endpoint_url`` (an S3-compatible server) and ``region``. Every botocore failure becomes an
:class:`ObjectStoreError` that names the URL and says what to check.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from dagkube.store.objects import Buffers, ObjectStore, ObjectStoreError

_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "InvalidToken",
    "ExpiredToken",
    "403",
}
_DELETE_BATCH = 1000  # DeleteObjects takes at most this many keys


class S3Store(ObjectStore):
    def __init__(
        self, url: str, bucket: str, prefix: str, options: dict[str, str], threshold_bytes: int
    ) -> None:
        super().__init__(url, threshold_bytes)
        if not bucket:
            raise ObjectStoreError(f"object store {url!r}: no bucket (s3://bucket/prefix)")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ObjectStoreError(
                f"object store {url!r} needs boto3: pip install 'dagkube[s3]'"
            ) from None
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        config = Config(connect_timeout=5, read_timeout=60, retries={"max_attempts": 3})
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=options.get("endpoint_url") or None,
            region_name=options.get("region") or None,
            config=config,
        )

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """botocore's failures as ObjectStoreErrors naming the URL and what to check."""
        from botocore import exceptions as boto

        try:
            yield
        except boto.NoCredentialsError:
            raise ObjectStoreError(
                f"object store {self.url}: no AWS credentials to {doing} (set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or a profile or role)"
            ) from None
        except (boto.EndpointConnectionError, boto.ConnectTimeoutError) as exc:
            raise ObjectStoreError(
                f"object store {self.url}: cannot reach the endpoint to {doing}: {exc}"
            ) from None
        except boto.ClientError as exc:
            raise self._client_error(exc, doing) from None
        except boto.BotoCoreError as exc:
            raise ObjectStoreError(f"object store {self.url}: cannot {doing}: {exc}") from None

    def _client_error(self, exc: Any, doing: str) -> ObjectStoreError:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        # HEAD requests get no error body: a missing bucket is a bare 404 there
        if code == "NoSuchBucket" or (code == "404" and doing == "reach the bucket"):
            return ObjectStoreError(
                f"object store {self.url}: bucket {self.bucket!r} does not exist"
            )
        if code in _CREDENTIAL_CODES:
            return ObjectStoreError(
                f"object store {self.url}: the credentials were refused to {doing} ({code}: "
                f"{error.get('Message', 'forbidden')}); check AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY and the bucket's policy"
            )
        return ObjectStoreError(f"object store {self.url}: cannot {doing}: {exc}")

    def check(self) -> None:
        with self._errors("reach the bucket"):
            self._client.head_bucket(Bucket=self.bucket)

    def put(self, name: str, data: Buffers) -> None:
        if isinstance(data, bytes | bytearray | memoryview):
            body: Any = bytes(data) if isinstance(data, memoryview) else data
        else:  # one request needs one body: the parts are joined (a single copy)
            body = b"".join(data)
        with self._errors(f"put {name}"):
            self._client.put_object(Bucket=self.bucket, Key=self.prefix + name, Body=body)

    def get(self, name: str) -> bytes | None:
        from botocore import exceptions as boto

        with self._errors(f"get {name}"):
            try:
                reply = self._client.get_object(Bucket=self.bucket, Key=self.prefix + name)
            except boto.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    return None
                raise
            return self._read(name, reply)

    def _read(self, name: str, reply: dict) -> bytes:
        """The body, chunk by chunk into one preallocated bytearray (which the reader then
        uses in place: dagkube.runtime.inputs.deserialize)."""
        value = bytearray(int(reply["ContentLength"]))
        view, done = memoryview(value), 0
        for chunk in reply["Body"].iter_chunks(1 << 20):
            view[done : done + len(chunk)] = chunk
            done += len(chunk)
        if done != len(value):
            raise ObjectStoreError(
                f"object store {self.url}: {name} ended after {done} of {len(value)} bytes"
            )
        return value  # type: ignore[return-value]  # bytes-like, as DirectoryStore's

    def delete(self, name: str) -> None:
        with self._errors(f"delete {name}"):
            self._client.delete_object(Bucket=self.bucket, Key=self.prefix + name)

    def delete_prefix(self, prefix: str) -> None:
        with self._errors(f"delete {prefix}"):
            keys = [obj["Key"] for obj in self._listed(self.prefix + prefix)]
            for start in range(0, len(keys), _DELETE_BATCH):
                batch = [{"Key": key} for key in keys[start : start + _DELETE_BATCH]]
                self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )

    def run_prefixes(self) -> Iterator[tuple[str, str]]:
        with self._errors("list runs"):
            for namespace in self._folders(self.prefix):
                for run in self._folders(namespace):
                    relative = run[len(self.prefix) :]
                    yield relative.rstrip("/").rsplit("/", 1)[-1], relative

    def _listed(self, prefix: str) -> Iterator[dict]:
        pages = self._client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix):
            yield from page.get("Contents", [])

    def _folders(self, prefix: str) -> Iterator[str]:
        pages = self._client.get_paginator("list_objects_v2")
        for page in pages.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/"):
            for common in page.get("CommonPrefixes", []):
                yield common["Prefix"]
