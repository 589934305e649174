"""The object-store interface the engine stands on, and the Litestream 0.5 layout of LTX files.

A `Storage` is rooted at one prefix (a directory or `bucket/prefix`) and speaks in relative keys with
`/` separators. Both implementations give the same guarantees:

- `put_file` and `put_bytes` are atomic: a reader sees the whole object or none of it, and after they
  return the object is durable (local: temp file, fsync, rename, fsync of the directory; S3: a
  completed PUT or multipart upload).
- Each LTX object carries its header timestamp where Litestream reads it: the file's mtime (local), or
  the S3 metadata key `litestream-timestamp` (RFC 3339 with nanoseconds).
- `list` never returns partial uploads or temporary files.
- Failures raise `StorageError` (`.retryable` for 5xx, SlowDown, timeouts, dropped connections, after the
  implementation's own retries are exhausted) or `NotFound`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from sidecar.ltx import format_filename, parse_filename

# Level numbers: 0..8 consecutive, snapshots always at 9 (spec/compaction-levels.md §1).
SNAPSHOT_LEVEL = 9


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """One stored object: relative key, size in bytes, and timestamp in ms (header timestamp when known)."""

    key: str
    size: int
    timestamp: int


class Storage(Protocol):
    """An async object store rooted at one prefix. Keys are relative, `/`-separated."""

    url: str
    # "file" or "s3": selects the Litestream layout for level paths (see `level_dir`).
    kind: str

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None) -> None:
        """Store the local file at `path` under `key`, atomically and durably; `timestamp` in ms."""
        ...

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None) -> None:
        """Store `data` under `key`, atomically and durably."""
        ...

    async def get_bytes(self, key: str) -> bytes:
        """The whole object. Raises NotFound."""
        ...

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes from `start` (fewer at the end of the object). Raises NotFound."""
        ...

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        """The whole object and its ETag, or None when its ETag still equals `etag` (a conditional GET).

        Raises NotFound when the object is absent.
        """
        ...

    def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        """The object's bytes in chunks; resumes with a ranged GET if the connection drops mid-body."""
        ...

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        """Write the object to the local file `path` (temp file + rename); returns its size."""
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


def level_dir(kind: str, level: int) -> str:
    """The directory of one level inside a database's prefix, exactly as Litestream 0.5.17 lays it out.

    file backends: `ltx/<level in decimal>`; S3: `<level as %04x>` (spec/compaction-levels.md §3).
    """
    if not 0 <= level <= SNAPSHOT_LEVEL:
        raise ValueError(f"invalid level {level}: want 0..{SNAPSHOT_LEVEL}")
    return f"{level:04x}" if kind == "s3" else f"ltx/{level}"


def ltx_key(kind: str, db_prefix: str, level: int, min_txid: int, max_txid: int) -> str:
    """Key of an LTX file of `level` covering [min_txid, max_txid] under `db_prefix` (may be "")."""
    parts = [p for p in (db_prefix.strip("/"), level_dir(kind, level), format_filename(min_txid, max_txid)) if p]
    return "/".join(parts)


def parse_ltx_key(kind: str, key: str) -> tuple[str, int, int, int] | None:
    """Split a key into (db_prefix, level, min_txid, max_txid), or None if it is not an LTX file of a level."""
    parts = key.split("/")
    if len(parts) < 2:
        return None
    txids = parse_filename(parts[-1])
    if txids is None:
        return None
    if kind == "s3":
        lvl = parts[-2]
        if len(lvl) != 4 or any(c not in "0123456789abcdef" for c in lvl):
            return None
        level, prefix = int(lvl, 16), parts[:-2]
    else:
        if len(parts) < 3 or parts[-3] != "ltx" or not parts[-2].isdigit():
            return None
        level, prefix = int(parts[-2]), parts[:-3]
    if level > SNAPSHOT_LEVEL:
        return None
    return "/".join(prefix), level, txids[0], txids[1]


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
