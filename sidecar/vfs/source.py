"""Where a reader gets one database's backup: the store itself (here), or a backup server (`sidecar.vfs.http`).

A `Source` answers four questions, and counts what each costs in `stats`:

    plan(txid=|timestamp=|after=)   the files whose merge is the wanted state (a `Head`)
    read(key, start, length)        bytes of one stored file; NotFound when it is gone
    follow(tag, wait)               the newest head, once it differs from the one tagged `tag`
    key(entry)                      the name `read` takes for a file of the plan

`StoreSource` reads a `file://` or `s3://` store rooted at one database (`…/<cluster>/<db>`, or a
Litestream 0.5 replica, which has the same layout). At the latest state it reads the head object the
engine writes (`head.json`, see `sidecar.engine.head`): one GET to open, one conditional GET per poll to
follow, never a LIST. A store without a head object (a Litestream replica, or an engine that has not
flushed since it gained one) is planned as `restore` plans it: one LIST and one 100-byte read per file.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from urllib.parse import urlparse

import structlog

from sidecar.engine import head as heads
from sidecar.engine.head import Head
from sidecar.engine.index import FileEntry, scan
from sidecar.errors import NotFound, RestoreError, SidecarError
from sidecar.ltx import HEADER_SIZE
from sidecar.storage import ObjectInfo, Storage, open_storage
from sidecar.vfs.stats import Stats

log = structlog.get_logger("sidecar.vfs")


class Source(Protocol):
    """One database's backup, read in place."""

    url: str
    stats: Stats

    def key(self, entry: FileEntry) -> str:
        """The name `read` takes for a file of a plan."""
        ...

    async def plan(self, *, txid: int | None = None, timestamp: int | None = None,
                   after: int | None = None, listed: bool = False) -> Head:
        """The state at `txid`, at `timestamp` (ms), or the latest; with `after`, only the files a copy
        already at TXID `after` needs (see `head.plan_after`). Raises RestoreError when none is possible.
        `listed`: the latest from the files themselves, not a head object (which can name files deleted since)."""
        ...

    async def read(self, key: str, start: int, length: int) -> bytes:
        """`length` bytes of a stored file from `start`. Raises NotFound when the file was deleted."""
        ...

    async def download(self, key: str, path: Path) -> None:
        """A whole stored file into the local file `path`. Raises NotFound when the file was deleted."""
        ...

    async def follow(self, tag: str | None, wait: float) -> tuple[Head, str] | None:
        """The latest head and its tag if its tag is not `tag`; None if nothing changed.

        A server holds the request up to `wait` seconds for a change; a store is asked once, after a
        pause of its poll interval (so a follower calling this in a loop polls at that rate).
        """
        ...

    async def close(self) -> None:
        ...


@runtime_checkable
class PageServer(Protocol):
    """A source that resolves pages itself (the backup server): a reader then needs no page index."""

    async def pages(self, txid: int, pgno: int, count: int, checksum: int = 0) -> list[tuple[int, str, bytes]]:
        """Pages pgno..pgno+count-1 (within the database, the lock page skipped) as of `txid`, each as
        (pgno, the `key` of the file it is in, its frame as stored). NotFound when `txid` is no longer
        readable (compaction and retention moved past it), or no longer has the post-apply `checksum` (0: not
        checked) because the database was started over."""
        ...


def open_source(url: str, *, token: str = "", poll_interval: float = 1.0, **s3_options: Any) -> Source:
    """`file:///root/<cluster>/<db>`, `s3://bucket/prefix/<cluster>/<db>` (or a Litestream replica URL),
    or a backup server `http(s)://host:port/<db>[?cluster=NAME]` read with `token`."""
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        from sidecar.vfs.http import ServerSource  # aiohttp's client, only for server URLs (as open_storage does)
        return ServerSource(url, token=token)
    return StoreSource(open_storage(url, **s3_options), poll_interval=poll_interval)


class StoreSource:
    """A store rooted at one database: `file://` or `s3://`."""

    def __init__(self, storage: Storage, *, poll_interval: float = 1.0) -> None:
        self.stats = Stats()
        self.storage = _Counted(storage, self.stats)
        self.url = storage.url
        self.poll_interval = poll_interval
        self._listing = False  # following by LIST, for want of a head object (warned once)

    def key(self, entry: FileEntry) -> str:
        return heads.ltx_object_key(self.storage, "", entry)

    async def plan(self, *, txid: int | None = None, timestamp: int | None = None,
                   after: int | None = None, listed: bool = False) -> Head:
        if txid is None and timestamp is None and after is None and not listed:
            try:
                got = await self.storage.get_if_changed(heads.HEAD_NAME, None)
                assert got is not None
                return self._decode(got[0])
            except NotFound:
                pass
        index = await scan(self.storage, "")
        try:
            if after is not None:
                chain = heads.plan_after(index, after, txid=txid)
                return Head.of_plan(chain) if chain else Head.of_plan(heads.plan(index, txid=txid))
            return Head.of_plan(heads.plan(index, txid=txid, timestamp=timestamp))
        except RestoreError as err:
            raise RestoreError(f"{self.url}: {err}") from None  # which backup, for a reader of many

    async def read(self, key: str, start: int, length: int) -> bytes:
        return await self.storage.get_range(key, start, length)

    async def download(self, key: str, path: Path) -> None:
        await self.storage.download(key, path)

    async def follow(self, tag: str | None, wait: float) -> tuple[Head, str] | None:
        if tag is not None:
            await asyncio.sleep(min(wait, self.poll_interval))
        self.stats.polls += 1
        try:
            got = await self.storage.get_if_changed(heads.HEAD_NAME, tag)
        except NotFound:
            pass  # no head object (yet): plan from a LIST, and look for the head object again next time
        else:
            if got is None:
                return None
            self._listing = False
            return self._decode(got[0]), got[1]
        if not self._listing:
            log.warning("no head object: following by LIST", url=self.url, poll_s=self.poll_interval)
            self._listing = True
        index = await scan(self.storage, "")
        head = Head.of_plan(heads.plan(index))
        new_tag = f"list:{head.txid:016x}:{len(index)}:{index.size}"
        return None if new_tag == tag else (head, new_tag)

    def _decode(self, data: bytes) -> Head:
        try:
            return heads.decode(data)
        except ValueError as err:
            raise SidecarError(f"{self.url}/{heads.HEAD_NAME}: invalid head object: {err}") from None

    async def close(self) -> None:
        await self.storage.close()


class _Counted:
    """A Storage that counts requests and bytes received into `reads` (the reads a reader makes).

    It also remembers each LTX file's header, by key and size: a stored file never changes, so planning
    another target later (`scan`: one LIST, one header read per file) reads only the headers of new files.
    """

    def __init__(self, inner: Storage, stats: Stats) -> None:
        self.inner = inner
        self.reads = stats
        self.stats = inner.stats
        self.url = inner.url
        self.layout = inner.layout
        self._sizes: dict[str, int] = {}  # from the last LIST
        self._headers: dict[tuple[str, int], bytes] = {}

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        raise SidecarError(f"{key}: readers never write")

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        raise SidecarError(f"{key}: readers never write")

    async def check_conditional_writes(self) -> None:
        raise SidecarError(f"{self.url}: readers never write")

    async def head(self, key: str) -> ObjectInfo:
        self.reads.requests += 1
        return await self.inner.head(key)

    async def local_files(self, keys: Sequence[str], tmpdir: Path) -> list[Path]:
        self.reads.requests += len(keys)
        return await self.inner.local_files(keys, tmpdir)

    async def get_bytes(self, key: str) -> bytes:
        self.reads.requests += 1
        data = await self.inner.get_bytes(key)
        self.reads.bytes += len(data)
        return data

    async def get_range(self, key: str, start: int, length: int) -> bytes:
        header = (key, self._sizes.get(key, -1)) if start == 0 and length == HEADER_SIZE else None
        if header is not None and header in self._headers:
            return self._headers[header]
        self.reads.requests += 1
        data = await self.inner.get_range(key, start, length)
        self.reads.bytes += len(data)
        if header is not None and header[1] >= 0:
            self._headers[header] = data
        return data

    async def get_if_changed(self, key: str, etag: str | None) -> tuple[bytes, str] | None:
        self.reads.requests += 1
        got = await self.inner.get_if_changed(key, etag)
        self.reads.bytes += len(got[0]) if got else 0
        return got

    async def stream(self, key: str, chunk_size: int = 1 << 20) -> AsyncIterator[bytes]:
        self.reads.requests += 1
        async for chunk in self.inner.stream(key, chunk_size):
            self.reads.bytes += len(chunk)
            yield chunk

    async def download(self, key: str, path: str | os.PathLike[str]) -> int:
        self.reads.requests += 1
        n = await self.inner.download(key, path)
        self.reads.bytes += n
        return n

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        self.reads.requests += 1
        self.reads.lists += 1
        objects = await self.inner.list(prefix)
        self._sizes = {o.key: o.size for o in objects}
        self._headers = {k: v for k, v in self._headers.items() if self._sizes.get(k[0]) == k[1]}
        return objects

    async def delete(self, keys: Sequence[str]) -> None:
        raise SidecarError(f"{', '.join(keys)}: readers never delete")

    async def close(self) -> None:
        await self.inner.close()


__all__ = ["PageServer", "Source", "Stats", "StoreSource", "open_source"]
