"""S3-compatible object storage through aiobotocore: the only module that imports botocore.

Our own retry loop governs (botocore's is set to one attempt): exponential backoff with full jitter on
5xx, SlowDown and throttling, timeouts and dropped connections; every attempt has a deadline. Large files go
up as multipart uploads; reads resume with a ranged GET when a connection drops mid-body. LTX objects carry
the `litestream-timestamp` metadata Litestream reads.

Conditional writes send `If-None-Match: *` or `If-Match: <etag>` (AWS S3, R2, Tigris, MinIO and moto all honour
them; some older gateways ignore them and overwrite, which `check_conditional_writes` finds at start). A retried
conditional PUT is ambiguous: the first attempt may have landed before its answer was lost, and the retry then
fails its own condition. Each conditional PUT therefore carries a random `put-id` in its
metadata; a 412 after a retry reads the object's metadata back and, if the put-id is ours, reports success.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from sidecar.errors import ConditionalWritesIgnored, NotFound, PreconditionFailed, StorageError
from sidecar.retry import full_jitter
from sidecar.storage.base import ObjectInfo, RequestStats, format_rfc3339_nano, parse_rfc3339
from sidecar.storage.layout import PROBE_PREFIX, S3_LAYOUT

T = TypeVar("T")

MIN_PART = 5 << 20  # S3's smallest part, except the last
RETRYABLE_CODES = {"SlowDown", "RequestTimeout", "Throttling", "ThrottlingException", "InternalError",
                   "ServiceUnavailable", "RequestTimeTooSkewed", "503", "500", "502", "504"}
TIMESTAMP_KEY = "litestream-timestamp"
PUT_ID_KEY = "put-id"


class _NotModified(Exception):
    """A conditional GET found the object unchanged (HTTP 304)."""


class S3Storage:
    """Objects under `s3://bucket/prefix/`. Credentials come from the environment or the AWS chain."""

    layout = S3_LAYOUT

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None, region: str | None = None,
                 force_path_style: bool | None = None, multipart_threshold: int = 16 << 20,
                 part_size: int = 16 << 20, max_attempts: int = 8, backoff_base: float = 0.1,
                 backoff_cap: float = 10.0, connect_timeout: float = 10.0, read_timeout: float = 30.0,
                 attempt_timeout: float = 60.0, download_concurrency: int = 16) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self.endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.region = region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        self.force_path_style = bool(force_path_style)
        self.multipart_threshold = max(multipart_threshold, MIN_PART)
        self.part_size = max(part_size, MIN_PART)
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._timeouts = (connect_timeout, read_timeout)
        self.attempt_timeout = attempt_timeout  # seconds for one request, whatever the server does
        self.download_concurrency = download_concurrency
        self._stack: AsyncExitStack | None = None
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._checked = False  # conditional writes proven honoured (check_conditional_writes)
        self._check_lock = asyncio.Lock()
        self.requests = 0  # every HTTP request attempted, for cost tests and metrics
        self.stats = RequestStats()

    # -- plumbing -------------------------------------------------------------------------------------

    async def _get_client(self) -> Any:
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    plain_http = bool(self.endpoint_url and self.endpoint_url.startswith("http://"))
                    s3_cfg: dict[str, Any] = {"addressing_style": "path" if self.force_path_style else "auto"}
                    if plain_http:
                        s3_cfg["payload_signing_enabled"] = False
                    config = AioConfig(
                        retries={"max_attempts": 1, "mode": "standard"}, s3=s3_cfg,
                        connect_timeout=self._timeouts[0], read_timeout=self._timeouts[1],
                        request_checksum_calculation="when_required",
                        response_checksum_validation="when_required", max_pool_connections=64)
                    stack = AsyncExitStack()
                    self._client = await stack.enter_async_context(get_session().create_client(
                        "s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config))
                    self._stack = stack
        return self._client

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or "\x00" in key or ".." in key.split("/"):
            raise StorageError(key, "invalid key: empty, absolute, or escaping the store")
        return f"{self.prefix}/{key}" if self.prefix else key

    async def _call(self, key: str, op: Callable[[Any], Awaitable[T]], name: str = "get") -> T:
        """Run `op(client)` with retries and a deadline per attempt; map failures to StorageError and its kinds.
        Each attempt is recorded in `stats` under `name`."""
        client = await self._get_client()
        attempt = 0
        while True:
            attempt += 1
            self.requests += 1
            t0 = time.perf_counter()
            ok = False
            try:
                async with asyncio.timeout(self.attempt_timeout):
                    result = await op(client)
                ok = True
                return result
            except ClientError as err:
                code = str(err.response.get("Error", {}).get("Code", ""))
                status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
                if code == "NoSuchBucket":  # also a 404, but no object's absence: the configuration is wrong
                    raise StorageError(key, f"S3 bucket {self.bucket!r} does not exist (NoSuchBucket)") from None
                if status == 404 or code in ("NoSuchKey", "404", "NotFound"):
                    raise NotFound(key) from None
                if status == 304 or code == "304":
                    raise _NotModified() from None
                if status == 412 or code in ("PreconditionFailed", "ConditionalRequestConflict"):
                    raise PreconditionFailed(key) from None
                retryable = status >= 500 or status == 429 or code in RETRYABLE_CODES
                if not retryable or attempt >= self.max_attempts:
                    raise StorageError(key, f"S3 {code or status}: {err}", retryable=retryable) from err
            except (BotoCoreError, aiohttp.ClientError, TimeoutError, OSError) as err:
                if attempt >= self.max_attempts:
                    raise StorageError(key, f"S3 request failed: {type(err).__name__}: {err}",
                                       retryable=True) from err
            finally:
                self.stats.record(name, time.perf_counter() - t0, ok)
            await asyncio.sleep(full_jitter(attempt - 1, self.backoff_base, self.backoff_cap))

    # -- the start-up check --------------------------------------------------------------------------

    async def check_conditional_writes(self) -> None:
        """Raise ConditionalWritesIgnored if the endpoint ignores `If-None-Match: *` or `If-Match` on PUT: write a
        scratch object, PUT it again under each condition (both must fail with 412), delete it. Once per object:
        four requests at start, none per write after."""
        async with self._check_lock:
            if self._checked:
                return
            key = PROBE_PREFIX + secrets.token_hex(8)
            await self.put_bytes(key, b"probe")
            try:
                ignored = await self._overwrites(key)
            except BaseException:
                with contextlib.suppress(StorageError):
                    await self.delete([key])
                raise
            await self.delete([key])
            if ignored:
                raise ConditionalWritesIgnored(self.url, self.endpoint_url or f"AWS S3 ({self.region})", ignored)
            self._checked = True

    async def _overwrites(self, key: str) -> builtins.list[str]:
        """The conditions that failed to stop an overwrite of the existing object `key`."""
        ignored = []
        try:
            await self.put_bytes(key, b"created again", if_none_match=True)
            ignored.append("If-None-Match")
        except PreconditionFailed:
            pass
        try:
            await self.put_bytes(key, b"replaced", if_match=f'"{secrets.token_hex(16)}"')  # an ETag it never had
            ignored.append("If-Match")
        except PreconditionFailed:
            pass
        return ignored

    # -- writes ---------------------------------------------------------------------------------------

    def _metadata(self, timestamp: int | None, conditional: bool) -> dict[str, str]:
        meta = {TIMESTAMP_KEY: format_rfc3339_nano(timestamp)} if timestamp is not None else {}
        if conditional:
            meta[PUT_ID_KEY] = secrets.token_hex(12)
        return meta

    @staticmethod
    def _conditions(if_none_match: bool, if_match: str | None) -> dict[str, str]:
        if if_none_match:
            return {"IfNoneMatch": "*"}
        return {"IfMatch": if_match} if if_match is not None else {}

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        full, cond = self._key(key), self._conditions(if_none_match, if_match)
        meta = self._metadata(timestamp, bool(cond))
        return await self._conditional(key, meta, lambda c: c.put_object(
            Bucket=self.bucket, Key=full, Body=data, Metadata=meta, **cond))

    async def _conditional(self, key: str, meta: dict[str, str], op: Callable[[Any], Awaitable[Any]]) -> str:
        """Run a PUT (or multipart completion); a lost condition is ours if the stored put-id is ours."""
        before = self.requests
        try:
            resp = await self._call(key, op, "put")
        except NotFound:
            if PUT_ID_KEY not in meta:
                raise
            raise PreconditionFailed(key, "precondition failed: the object is gone") from None  # If-Match, no object
        except PreconditionFailed:
            if PUT_ID_KEY not in meta or self.requests - before < 2:
                raise  # a first attempt that failed its condition: another writer's object is there
            info, theirs = await self._head(key)
            if theirs.get(PUT_ID_KEY) != meta[PUT_ID_KEY]:
                raise
            return info.etag
        return str(resp.get("ETag", ""))

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        size = os.path.getsize(path)
        if size < self.multipart_threshold:
            data = await asyncio.to_thread(Path(path).read_bytes)
            return await self.put_bytes(key, data, timestamp=timestamp, if_none_match=if_none_match,
                                        if_match=if_match)
        full, cond = self._key(key), self._conditions(if_none_match, if_match)
        meta = self._metadata(timestamp, bool(cond))
        created = await self._call(key, lambda c: c.create_multipart_upload(Bucket=self.bucket, Key=full,
                                                                              Metadata=meta), "put")
        upload_id = created["UploadId"]
        try:
            parts = []
            with open(path, "rb") as f:
                number = 0
                while chunk := await asyncio.to_thread(f.read, self.part_size):
                    number += 1

                    async def part(c: Any, n: int = number, body: bytes = chunk) -> Any:
                        return await c.upload_part(Bucket=self.bucket, Key=full, UploadId=upload_id,
                                                   PartNumber=n, Body=body)
                    resp = await self._call(key, part, "put")
                    parts.append({"PartNumber": number, "ETag": resp["ETag"]})
            return await self._conditional(key, meta, lambda c: c.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": parts}, **cond))
        except BaseException:
            try:
                await self._call(key, lambda c: c.abort_multipart_upload(Bucket=self.bucket, Key=full,
                                                                         UploadId=upload_id), "delete")
            except StorageError:
                pass  # the bucket's lifecycle rules clean up what we could not
            raise

    async def delete(self, keys: Sequence[str]) -> None:
        keys = list(keys)
        for i in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[i:i + 1000]]

            async def op(c: Any, objects: builtins.list[dict[str, str]] = batch) -> Any:
                return await c.delete_objects(Bucket=self.bucket, Delete={"Objects": objects, "Quiet": True})
            resp = await self._call(keys[i], op, "delete")
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(first.get("Key", keys[i]), f"delete failed: {first.get('Message')}",
                                   retryable=True)

    # -- reads ----------------------------------------------------------------------------------------

    async def get_bytes(self, key: str) -> bytes:
        out = bytearray()
        async for chunk in self.stream(key):
            out += chunk
        return bytes(out)

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        out = bytearray()
        async for chunk in self._ranged(key, start, start + length - 1):
            out += chunk
        return bytes(out)

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        async for chunk in self._ranged(key, 0, None, chunk_size):
            yield chunk

    async def _ranged(self, key: str, start: int, end: int | None, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """Bytes start..end (inclusive; None = to the end), resuming after a drop mid-body (of the same object only:
        a resumed GET carries If-Match with the first answer's ETag, so a replacement is never spliced in)."""
        full = self._key(key)
        pos = start
        drops = 0
        etag = ""
        while end is None or pos <= end:
            rng = f"bytes={pos}-{'' if end is None else end}"
            same = {"IfMatch": etag} if etag else {}
            try:
                async def get(c: Any, r: str = rng, cond: dict[str, str] = same) -> Any:
                    return await c.get_object(Bucket=self.bucket, Key=full, Range=r, **cond)
                resp = await self._call(key, get)
            except PreconditionFailed:
                raise StorageError(key, "the object changed while it was read", retryable=True) from None
            except StorageError as err:
                if "InvalidRange" in str(err):
                    return  # the object ends at or before `pos` (where we stopped, or it is shorter or empty)
                raise
            body = resp["Body"]
            total = _total_size(resp)
            etag = etag or str(resp.get("ETag", ""))
            try:
                while True:
                    chunk = await body.read(chunk_size)
                    if not chunk:
                        break
                    pos += len(chunk)
                    yield chunk
            except (aiohttp.ClientError, BotoCoreError, TimeoutError, OSError) as err:
                drops += 1
                if drops >= self.max_attempts:
                    raise StorageError(key, f"S3 read dropped {drops} times: {err}", retryable=True) from err
                await asyncio.sleep(full_jitter(drops, self.backoff_base, self.backoff_cap))
                continue
            finally:
                body.close()
            want = (end + 1) if end is not None else total
            if want is not None and pos < want:
                drops += 1  # the body ended early without an error: resume
                if drops >= self.max_attempts:
                    raise StorageError(key, f"S3 read ended at byte {pos} of {want}", retryable=True)
                continue
            return

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        dst = Path(path)
        tmp = dst.with_name(f".{dst.name}.tmp")
        n = 0
        try:
            with open(tmp, "wb") as f:
                async for chunk in self.stream(key):
                    f.write(chunk)
                    n += len(chunk)
            os.replace(tmp, dst)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return n

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> builtins.list[Path]:
        tmpdir.mkdir(parents=True, exist_ok=True)
        paths = [tmpdir / f"{i:05d}.ltx" for i in range(len(keys))]
        sem = asyncio.Semaphore(self.download_concurrency)

        async def fetch(key: str, path: Path) -> None:
            async with sem:
                await self.download(key, path)
        await asyncio.gather(*(fetch(k, p) for k, p in zip(keys, paths, strict=True)))
        return paths

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        full = self._key(key)
        cond = {"IfNoneMatch": etag} if etag else {}

        async def get(c: Any) -> tuple[bytes, str]:
            resp = await c.get_object(Bucket=self.bucket, Key=full, **cond)
            async with resp["Body"] as body:
                return await body.read(), str(resp.get("ETag", ""))
        try:
            return await self._call(key, get)
        except _NotModified:
            return None

    async def head(self, key: str) -> ObjectInfo:
        return (await self._head(key))[0]

    async def _head(self, key: str) -> tuple[ObjectInfo, dict[str, str]]:
        full = self._key(key)
        resp = await self._call(key, lambda c: c.head_object(Bucket=self.bucket, Key=full), "head")
        meta = {k.lower(): v for k, v in (resp.get("Metadata") or {}).items()}
        ts = parse_rfc3339(meta[TIMESTAMP_KEY]) if TIMESTAMP_KEY in meta else \
            int(resp["LastModified"].timestamp() * 1000)
        return ObjectInfo(key, int(resp.get("ContentLength", 0)), ts, str(resp.get("ETag", ""))), meta

    async def list(self, prefix: str = "") -> builtins.list[ObjectInfo]:
        base = f"{self.prefix}/" if self.prefix else ""
        out: builtins.list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
            if token:
                kwargs["ContinuationToken"] = token
            async def page(c: Any, kw: dict[str, Any] = kwargs) -> Any:
                return await c.list_objects_v2(**kw)
            resp = await self._call(prefix or "/", page, "list")
            for obj in resp.get("Contents", []):
                out.append(ObjectInfo(obj["Key"][len(base):], int(obj["Size"]),
                                      int(obj["LastModified"].timestamp() * 1000), str(obj.get("ETag", ""))))
            if not resp.get("IsTruncated"):
                break
            token = resp.get("NextContinuationToken")
        out.sort(key=lambda o: o.key)
        return out

    async def close(self) -> None:
        if self._stack is not None:
            await self._stack.aclose()
        self._stack = None
        self._client = None


def _total_size(resp: dict[str, Any]) -> int | None:
    """The object's whole size from Content-Range (`bytes a-b/total`), when the answer has one."""
    rng = resp.get("ContentRange")
    if rng and "/" in rng:
        tail = rng.rsplit("/", 1)[1]
        return int(tail) if tail.isdigit() else None
    return None
