"""The object-store interface the engine stands on.

A `Storage` is rooted at one prefix (a directory or `bucket/prefix`) and speaks in relative keys with
`/` separators; its `layout` says where each kind of object lives (`layout.py`). Both implementations give the
same guarantees:

- `put_file` and `put_bytes` are atomic: a reader sees the whole object or none of it, and after they
  return the object is durable (local: temp file, fsync, rename or link, fsync of the directory; S3: a
  completed PUT or multipart upload). They return the new object's ETag.
- Conditional writes, as S3 defines them: `if_none_match=True` creates the object only if no object has the
  key; `if_match=etag` replaces it only if its ETag is still `etag`. A failed condition raises
  `PreconditionFailed` and changes nothing. This is what fences writers (engine/lease.py): two writers can
  never both think they wrote the same key. Some S3-compatible endpoints ignore the headers and overwrite, so
  `check_conditional_writes` proves them once, before anything relies on them (the engine calls it at open).
- Each LTX object carries its header timestamp where Litestream reads it: the file's mtime (local), or
  the S3 metadata key `litestream-timestamp` (RFC 3339 with nanoseconds).
- `list` never returns partial uploads or temporary files.
- Failures raise `StorageError` (`.retryable` for 5xx, SlowDown, timeouts, dropped connections, after the
  implementation's own retries are exhausted) or `NotFound`. Every request has a deadline.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from sidecar.storage.layout import SNAPSHOT_LEVEL, Layout


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: relative key, size in bytes, timestamp in ms (header timestamp when known), ETag."""

    key: str
    size: int
    timestamp: int
    etag: str = ""


BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1.0, 2.5, 5.0, 10.0, 30.0, float("inf"))


class RequestStats:
    """Requests a store made, by operation: how many, how long, and failures (for /metrics)."""

    def __init__(self) -> None:
        self.count: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.errors: dict[str, int] = {}
        self.buckets: dict[str, list[int]] = {}  # cumulative counts per BUCKETS bound

    def record(self, op: str, seconds: float, ok: bool = True) -> None:
        self.count[op] = self.count.get(op, 0) + 1
        self.seconds[op] = self.seconds.get(op, 0.0) + seconds
        if not ok:
            self.errors[op] = self.errors.get(op, 0) + 1
        counts = self.buckets.setdefault(op, [0] * len(BUCKETS))
        for i, bound in enumerate(BUCKETS):
            if seconds <= bound:
                counts[i] += 1


class Storage(Protocol):
    """An async object store rooted at one prefix. Keys are relative, `/`-separated."""

    url: str
    layout: Layout
    stats: RequestStats  # what it has done, for metrics

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        """Store the local file at `path` under `key`, atomically and durably; `timestamp` in ms. Returns the ETag."""
        ...

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        """Store `data` under `key`, atomically and durably. Returns the ETag."""
        ...

    async def check_conditional_writes(self) -> None:
        """Raise ConditionalWritesIgnored unless this store enforces `if_none_match` and `if_match`. A few requests
        the first time it is called on this object (S3 writes, tries to overwrite and deletes a scratch object
        under `PROBE_PREFIX`), nothing after that; a local directory enforces them itself and checks nothing.
        Other failures raise StorageError as any request does, and the next call checks again."""
        ...

    async def get_bytes(self, key: str) -> bytes:
        """The whole object. Raises NotFound."""
        ...

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        """The object and its ETag, or None if its ETag is still `etag` (a conditional GET). Raises NotFound."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start` (fewer at the end of the object). Raises NotFound."""
        ...

    def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; resumes with a ranged GET if the connection drops mid-body."""
        ...

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        """Write the object to the local file `path` (temp file + rename); returns its size."""
        ...

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> list[Path]:
        """Local files holding the objects' bytes, to map and read (never to change): the stored files
        themselves where the store is a local directory, otherwise downloads into `tmpdir`, made (with its parents)
        if missing: the caller removes it if it exists afterwards. Raises NotFound."""
        ...

    async def head(self, key: str) -> ObjectInfo:
        """Size, timestamp and ETag of one object. Raises NotFound."""
        ...

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every object whose key starts with `prefix`, sorted by key."""
        ...

    async def delete(self, keys: Sequence[str]) -> None:
        """Delete `keys`; missing keys are not an error."""
        ...

    async def close(self) -> None:
        """Release connections."""
        ...


def format_rfc3339_nano(ms: int) -> str:
    """Go's time.RFC3339Nano for a millisecond timestamp, as Litestream writes `litestream-timestamp`."""
    dt = datetime.fromtimestamp(ms // 1000, tz=UTC)
    frac = f"{(ms % 1000) * 1_000_000:09d}".rstrip("0")
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + (f".{frac}" if frac else "") + "Z"


def parse_rfc3339(text: str) -> int:
    """Parse an RFC 3339 timestamp (any precision, `Z` or an offset) into ms since the epoch."""
    t = text.strip()
    if t.endswith(("Z", "z")):
        t = t[:-1] + "+00:00"
    frac = ""
    if "." in t:
        head, rest = t.split(".", 1)
        i = 0
        while i < len(rest) and rest[i].isdigit():
            i += 1
        frac, t = rest[:i], head + rest[i:]
    dt = datetime.fromisoformat(t)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    ms = int(dt.timestamp()) * 1000
    return ms + int((frac + "000")[:3]) if frac else ms


__all__ = ["BUCKETS", "SNAPSHOT_LEVEL", "Layout", "ObjectInfo", "RequestStats", "Storage", "format_rfc3339_nano",
           "parse_rfc3339"]
