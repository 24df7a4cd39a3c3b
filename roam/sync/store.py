"""An S3 bucket (AWS S3, MinIO, R2, or any S3-compatible server) through obstore.

Credentials and endpoint come the way every S3 tool takes them: AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION and AWS_ENDPOINT_URL from the
environment, and an explicit endpoint (`--endpoint-url`) over that. Every failure is
raised as a SyncError by kind (refused, unavailable, missing): callers act on the type.
The client's own retries are kept short; the sync retries whole cycles with its own
backoff, so a store that is down never stalls a cycle for minutes.
"""

from __future__ import annotations

import datetime
import os
import re
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import obstore
from obstore.exceptions import (
    BaseError,
    PermissionDeniedError,
    UnauthenticatedError,
)
from obstore.store import S3Store

from roam.sync.errors import MissingObject, StoreRefused, StoreUnavailable

if TYPE_CHECKING:  # types of the stubs only
    from obstore.store import ClientConfig, RetryConfig, S3Config

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_PREFIX = re.compile(r"^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$")


@dataclass(frozen=True)
class StoreURL:
    """s3://BUCKET/PREFIX: where a sync goes (a VM N's sync point lives in PREFIX/N)."""

    bucket: str
    prefix: str = ""

    @classmethod
    def parse(cls, text: str) -> StoreURL:
        if not text.startswith("s3://"):
            raise ValueError(f"{text!r} is not an s3://BUCKET/PREFIX address")
        bucket, _, prefix = text.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        if not _BUCKET.match(bucket):
            raise ValueError(f"{bucket!r} is not a valid bucket name")
        if prefix and (not _PREFIX.match(prefix) or any(p in (".", "..") for p in
                                                          prefix.split("/"))):
            raise ValueError(f"{prefix!r} is not a valid prefix (letters, digits, . _ - "
                             "and /)")
        return cls(bucket, prefix)

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def child(self, name: str) -> StoreURL:
        return StoreURL(self.bucket, f"{self.prefix}/{name}" if self.prefix else name)


@dataclass(frozen=True)
class Listed:
    key: str  # relative to the store's prefix
    size: int
    modified: datetime.datetime


@dataclass
class Counters:
    """Requests made and bytes moved, for `peer ls` and the benchmark."""

    puts: int = 0
    gets: int = 0
    lists: int = 0
    deletes: int = 0
    bytes_up: int = 0
    bytes_down: int = 0

    @property
    def requests(self) -> int:
        return self.puts + self.gets + self.lists + self.deletes


class ObjectStore:
    """The objects under one s3://BUCKET/PREFIX; keys are relative to PREFIX."""

    def __init__(self, url: StoreURL, endpoint_url: str | None = None) -> None:
        self.url = url
        self.endpoint_url = endpoint_url
        config: S3Config = {}
        if endpoint_url:
            config["endpoint"] = endpoint_url
        client: ClientConfig = {"connect_timeout": datetime.timedelta(seconds=5),
                                  "timeout": datetime.timedelta(seconds=60)}
        # obstore refuses plain http unless told: a local MinIO or test server uses it.
        self._endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
        if self._endpoint.startswith("http://"):
            client["allow_http"] = True
        retry: RetryConfig = {"max_retries": 2, "retry_timeout": datetime.timedelta(seconds=10),
                      "backoff": {"init_backoff": datetime.timedelta(milliseconds=100),
                                  "max_backoff": datetime.timedelta(seconds=2),
                                  "base": 2}}
        self._s3 = S3Store(url.bucket, prefix=url.prefix or None, config=config or None,
                           client_options=client, retry_config=retry)
        self.counters = Counters()

    def _translate(self, exc: Exception, what: str) -> Exception:
        where = f"{self.url}"
        if isinstance(exc, PermissionDeniedError | UnauthenticatedError):
            return StoreRefused(f"{where} refused {what}: check AWS_ACCESS_KEY_ID and "
                                "AWS_SECRET_ACCESS_KEY (and the key's permissions)")
        if isinstance(exc, FileNotFoundError):
            return MissingObject(f"{what}: not found in {where}")
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreUnavailable(f"{where}: {what} failed: {first[:300]}")

    async def check(self) -> None:
        """Fail at once with one clear error if the bucket is missing or refuses us:
        write a probe object (a missing bucket answers a PUT with NoSuchBucket), list,
        and delete the probe."""
        await self.put(".roam-probe", b"")
        try:
            await obstore.list(self._s3, prefix="", chunk_size=1).collect_async()
        except (BaseError, OSError) as exc:
            raise self._translate(exc, "listing") from None
        await self.delete([".roam-probe"])

    async def put(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self._s3, key, data)
        except FileNotFoundError:  # PUT creates keys: only the bucket can be missing
            raise StoreRefused(f"no bucket {self.url.bucket!r} at "
                               f"{self._endpoint or 'the configured endpoint'}") from None
        except (BaseError, OSError) as exc:
            raise self._translate(exc, f"PUT {key}") from None
        self.counters.puts += 1
        self.counters.bytes_up += len(data)

    async def get(self, key: str) -> bytes:
        try:
            result = await obstore.get_async(self._s3, key)
            data = bytes(await result.bytes_async())
        except (BaseError, OSError) as exc:
            raise self._translate(exc, f"GET {key}") from None
        self.counters.gets += 1
        self.counters.bytes_down += len(data)
        return data

    async def delete(self, keys: Sequence[str]) -> None:
        if not keys:
            return
        try:
            await obstore.delete_async(self._s3, list(keys))
        except (BaseError, OSError) as exc:
            raise self._translate(exc, "DELETE") from None
        self.counters.deletes += 1

    async def list(self, prefix: str) -> AsyncIterator[Listed]:
        """Every object whose key starts with `prefix`, a page at a time."""
        try:
            async for page in obstore.list(self._s3, prefix=prefix, chunk_size=1000):
                self.counters.lists += 1
                for meta in page:
                    yield Listed(meta["path"], meta["size"], meta["last_modified"])
        except (BaseError, OSError) as exc:
            raise self._translate(exc, f"LIST {prefix}") from None
