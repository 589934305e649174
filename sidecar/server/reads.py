"""Reading backups in place through the server: plans, stored files by range, and a long-poll for changes.

    GET /db/plan?db=NAME[&txid=HEX|&timestamp=RFC3339][&after=HEX]
        the files whose merge is that state (`sidecar.engine.head` JSON), each with where its page index is
    GET /db/ltx?db=NAME&file=<level>/<min>-<max>.ltx
        a stored file; `Range: bytes=…` answers 206; a strong ETag and `Cache-Control: private, immutable`
        (a stored file never changes; private, because it is only for the token's cluster)
    GET /db/pages?db=NAME&txid=HEX&pgno=N[&count=K][&checksum=HEX]
        the frames of pages N..N+K-1 (K ≤ 256) as of that TXID (ENOTXID when `checksum`, the post-apply
        checksum the reader planned, is no longer that TXID's: the database was started over), resolved here
        from the plan's page indexes (read as needed and kept: whole when small, by windows for a big
        snapshot's): per page `>IBQQ`
        (pgno, and the level, min and max TXID of the file it came from) then its frame as stored (10-byte
        header and LZ4 block). A reader needs no page index of its own: a cold lookup is the plan and one
        request per page it misses
    GET /db/head?db=NAME[&wait=SECONDS]
        the latest state's plan with its ETag; with `If-None-Match: <that ETag>` the request is held until
        the state changes (a flush, compaction or retention) or `wait` passes (then 304): one request per
        change, so a follower needs no polling; a client that hangs up ends its poll at once

These only read, so read-only tokens (`<cluster> <token> read`) can use them, within their cluster. Errors
are the server's JSON `{code, error}`: 404 ENODB (no such database), ENOTXID (no state at that target),
ENOTFOUND (a file compaction or retention deleted: plan again), 416 for a range outside the file.
"""

from __future__ import annotations

import asyncio
import hashlib
import struct
from collections.abc import Mapping

from aiohttp import web

from sidecar.engine import Engine
from sidecar.engine import head as heads
from sidecar.engine.head import Head
from sidecar.engine.index import DbIndex, FileEntry
from sidecar.errors import RestoreError, SidecarError
from sidecar.ltx import lock_pgno, parse_filename
from sidecar.ltx.pageindex import MAX_PROBES, TAIL, SparseIndex, Unknown, index_span
from sidecar.protocol import hex_txid
from sidecar.server.guard import Guard
from sidecar.server.http import CLUSTER, error, send
from sidecar.storage.base import SNAPSHOT_LEVEL, parse_rfc3339

MAX_WAIT = 60.0  # seconds a long-poll may be held
MAX_PAGES = 256  # pages in one /db/pages answer
MAX_INDEXES = 512  # stored files whose page index (as read so far) is kept
_PAGE = struct.Struct(">IBQQ")  # pgno, and the level, min and max TXID of the file a frame comes from
IMMUTABLE = "private, max-age=31536000, immutable"
_HEADS_SLACK = 64  # heads cached beyond twice those of existing databases before deleted ones' are dropped
_SLICE = 1 << 20  # bytes of a ranged answer read from the store at once
_INDEX_TAIL = 25  # bytes at the end of an LTX v3 file that locate its page index


def _cached(key: str, e: FileEntry) -> str:
    """What the caches of page indexes know a stored file by: its key alone would be reused by another file once
    a database is deleted and started over (the same TXIDs, the same names); time, size and checksum differ."""
    return f"{key}@{e.timestamp}:{e.size}:{e.post:016x}"


class Reads:
    """The read routes of one server."""

    def __init__(self, engine: Engine, request_timeout: float = 300.0) -> None:
        self.engine = engine
        self.request_timeout = request_timeout  # the most a client may take to accept each chunk of a file
        self.stopping = asyncio.Event()
        self._indexes: dict[str, tuple[int, int]] = {}  # _cached(key, file) -> page index (offset, length)
        self._heads: dict[tuple[str, str], tuple[int, Head | None, str]] = {}  # by index version
        self._heads_limit = _HEADS_SLACK
        self._sparse: dict[str, SparseIndex] = {}  # _cached(key, file) -> its page index as read so far (recent last)
        self._plans: dict[tuple[str, str, int], tuple[int, list[FileEntry]]] = {}  # by index version

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/db/plan", self.get_plan)
        r.add_get("/db/ltx", self.get_ltx)
        r.add_get("/db/pages", self.get_pages)
        r.add_get("/db/head", self.get_head)
        app.on_shutdown.append(self._wake)

    async def _wake(self, app: web.Application) -> None:
        """At shutdown, answer held long-polls at once instead of holding the graceful stop."""
        self.stopping.set()
        async with self.engine.stored:
            self.engine.stored.notify_all()

    # -- helpers --------------------------------------------------------------------------------------

    def _db(self, request: web.Request) -> tuple[str, str, DbIndex]:
        cluster, name = request[CLUSTER], request.query.get("db", "")
        if cluster == "*":
            raise _BadRequest("the admin token needs ?cluster=")
        if not self.engine.exists(cluster, name):
            raise _NoDatabase(f"database {name!r} has no backup in cluster {cluster!r}")
        return cluster, name, self.engine.index(cluster, name)

    async def _located(self, prefix: str, plan: list[FileEntry] | tuple[FileEntry, ...]) -> Head:
        """The head of `plan` with where each file's page index is (read once per file, then remembered)."""
        storage = self.engine.storage

        async def locate(e: FileEntry) -> tuple[int, int]:
            key = heads.ltx_object_key(storage, prefix, e)
            loc = self._indexes.get(_cached(key, e))
            if loc is None:
                tail = await storage.get_range(key, max(0, e.size - _INDEX_TAIL), _INDEX_TAIL)
                try:
                    start, end = index_span(tail, e.size)
                except ValueError as err:
                    raise SidecarError(f"{key}: {err}") from None
                loc = self._indexes[_cached(key, e)] = (start, end - start)
                if len(self._indexes) > 100_000:
                    self._indexes.pop(next(iter(self._indexes)))
            return loc
        return Head.of_plan(plan, await asyncio.gather(*map(locate, plan)))

    async def _page_index(self, prefix: str, e: FileEntry) -> SparseIndex:
        """What is known of a stored file's page index (read as pages are asked for, by windows when it is
        big), kept for the most recently used MAX_INDEXES files."""
        key = heads.ltx_object_key(self.engine.storage, prefix, e)
        found = self._sparse.pop(_cached(key, e), None)
        if found is None:
            located = (await self._located(prefix, [e])).indexes
            assert located is not None
            start, length = located[0]
            found = SparseIndex(start, start + length, e.commit + 1)
            if length <= TAIL:
                found.hold(start, await self.engine.storage.get_range(key, start, length))
            while len(self._sparse) >= MAX_INDEXES:
                self._sparse.pop(next(iter(self._sparse)))
        self._sparse[_cached(key, e)] = found
        return found

    async def _take(self, key: str, index: SparseIndex, start: int, length: int, a: bool, b: bool) -> bool:
        try:
            return index.take(await self.engine.storage.get_range(key, start, length), start, a, b)
        except ValueError as err:
            raise SidecarError(f"{key}: {err}") from None

    async def _find(self, prefix: str, e: FileEntry, index: SparseIndex, pgno: int) -> tuple[int, int] | None:
        """(offset, size) of the frame of `pgno` in the file `e`, None if it does not hold it."""
        attempt = 0
        while True:
            try:
                return index.find(pgno)
            except Unknown:
                pass
            try:
                if index.settle(pgno):
                    continue
            except ValueError as err:
                raise SidecarError(f"{prefix}: {err}") from None
            start, length, a, b = index.read_for(pgno, attempt)
            key = heads.ltx_object_key(self.engine.storage, prefix, e)
            attempt = attempt + 1 if await self._take(key, index, start, length, a, b) else MAX_PROBES

    def _plan_at(self, cluster: str, name: str, index: DbIndex, txid: int) -> list[FileEntry]:
        version = index.version
        cached = self._plans.get((cluster, name, txid))
        if cached is None or cached[0] != version:
            if len(self._plans) > 1024:
                self._plans.clear()
            cached = self._plans[(cluster, name, txid)] = (version, heads.plan(index, txid=txid))
        return cached[1]

    def _latest(self, cluster: str, name: str, index: DbIndex) -> tuple[Head | None, str]:
        """The latest head (without index locations) and its ETag, recomputed only when the index changed."""
        version = index.version
        cached = self._heads.get((cluster, name))
        if cached is None or cached[0] != version:
            head = heads.latest(index)
            tag = f'"{hashlib.sha256(heads.encode(head)).hexdigest()[:32]}"' if head else '"none"'
            cached = self._heads[(cluster, name)] = (version, head, tag)
            if len(self._heads) > self._heads_limit:  # the heads of deleted databases go (amortised: limit doubles)
                self._heads = {k: v for k, v in self._heads.items() if self.engine.exists(*k)}
                self._heads_limit = 2 * len(self._heads) + _HEADS_SLACK
        return cached[1], cached[2]

    # -- routes ---------------------------------------------------------------------------------------

    async def get_plan(self, request: web.Request) -> web.Response:
        cluster, name, index = self._db(request)
        q = request.query
        txid, after = _hex(q, "txid"), _hex(q, "after")
        timestamp = None
        if q.get("timestamp"):
            try:
                timestamp = parse_rfc3339(q["timestamp"])
            except ValueError:
                raise _BadRequest(f"timestamp {q['timestamp']!r}: want RFC 3339") from None
        if after is not None:
            if timestamp is not None:
                raise _BadRequest("after takes a txid, not a timestamp")
            plan = heads.plan_after(index, after, txid=txid)
            if not plan:
                plan = heads.plan(index, txid=txid)
        else:
            plan = heads.plan(index, txid=txid, timestamp=timestamp)
        head = await self._located(f"{cluster}/{name}", plan)
        return web.Response(body=heads.encode(head), content_type="application/json")

    async def get_ltx(self, request: web.Request) -> web.StreamResponse:
        cluster, name, index = self._db(request)
        spec = request.query.get("file", "")
        level_text, _, filename = spec.partition("/")
        txids = parse_filename(filename)
        if not _digits(level_text) or int(level_text) > SNAPSHOT_LEVEL or txids is None:
            raise _BadRequest(f"file {spec!r}: want <level>/<min txid>-<max txid>.ltx")
        level = int(level_text)
        entry = next((e for e in index.level(level) if (e.min_txid, e.max_txid) == txids), None)
        if entry is None:
            raise _Gone(f"{spec}: no such file (compaction or retention may have deleted it: plan again)")
        etag = f'"{level}-{entry.min_txid:016x}-{entry.max_txid:016x}-{entry.size:x}"'
        headers = {"ETag": etag, "Cache-Control": IMMUTABLE, "Accept-Ranges": "bytes"}
        if request.headers.get("If-None-Match") == etag:
            return web.Response(status=304, headers=headers)
        key = heads.ltx_object_key(self.engine.storage, f"{cluster}/{name}", entry)
        try:
            rng = _range(request.headers.get("Range"), entry.size)
        except _BadRange as err:
            refused = error(416, err.code, str(err))
            refused.headers["Content-Range"] = f"bytes */{entry.size}"
            return refused
        if rng is None:
            start, end, status = 0, entry.size, 200
        else:
            start, end = rng
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        if request.method == "HEAD":
            await resp.prepare(request)
        elif status == 206:
            await resp.prepare(request)
            # By slices: a range may be the whole of a multi-GB snapshot, never held in memory at once.
            while start < end:
                data = await self.engine.storage.get_range(key, start, min(_SLICE, end - start))
                if not data:
                    raise SidecarError(f"{key}: the stored file ends at byte {start}, before its indexed size")
                await send(request, resp, data, self.request_timeout)
                start += len(data)
        else:
            await resp.prepare(request)
            async for chunk in self.engine.storage.stream(key):
                await send(request, resp, chunk, self.request_timeout)
        await resp.write_eof()
        return resp

    async def get_pages(self, request: web.Request) -> web.Response:
        cluster, name, index = self._db(request)
        q = request.query
        txid = _hex(q, "txid")
        checksum = hex_txid(q.get("checksum", "0"))  # a checksum is 16 hex digits too
        if checksum is None:
            raise _BadRequest(f"checksum {q['checksum']!r}: want up to 16 hex digits")
        try:
            pgno, count = int(q.get("pgno", "")), int(q.get("count", "1"))
        except ValueError:
            raise _BadRequest("pgno and count: want integers") from None
        if txid is None or pgno < 1 or not 1 <= count <= MAX_PAGES:
            raise _BadRequest(f"want txid=HEX, pgno >= 1 and count 1..{MAX_PAGES}")
        plan = self._plan_at(cluster, name, index, txid)
        prefix, last = f"{cluster}/{name}", plan[-1]
        if checksum and last.post and last.post != checksum:
            raise RestoreError(f"TXID {txid:016x} now holds another state (checksum {last.post:016x}, not "
                               f"{checksum:016x}): the database was started over")
        indexes = await asyncio.gather(*(self._page_index(prefix, e) for e in plan))
        lock = lock_pgno(last.page_size)
        found: list[tuple[int, int, int, int]] = []  # pgno, file, offset, size
        for p in range(pgno, min(pgno + count, last.commit + 1)):
            if p == lock:
                continue
            for i in range(len(plan) - 1, -1, -1):
                loc = await self._find(prefix, plan[i], indexes[i], p)
                if loc is not None:
                    found.append((p, i, *loc))
                    break
            else:
                raise SidecarError(f"{prefix}: TXID {txid:016x}: page {p} is in no file of the plan")
        # Neighbouring frames of one file come in one read.
        groups: list[list[tuple[int, int, int, int]]] = []
        for f in found:
            if groups and groups[-1][-1][1] == f[1] and groups[-1][-1][2] + groups[-1][-1][3] == f[2]:
                groups[-1].append(f)
            else:
                groups.append([f])

        async def read(group: list[tuple[int, int, int, int]]) -> bytes:
            e = plan[group[0][1]]
            start = group[0][2]
            return await self.engine.storage.get_range(heads.ltx_object_key(self.engine.storage, prefix, e), start,
                                                       group[-1][2] + group[-1][3] - start)
        body = bytearray()
        for group, data in zip(groups, await asyncio.gather(*map(read, groups)), strict=True):
            pos = 0
            for p, i, _, size in group:
                e = plan[i]
                body += _PAGE.pack(p, e.level, e.min_txid, e.max_txid) + data[pos:pos + size]
                pos += size
        return web.Response(body=bytes(body), content_type="application/octet-stream",
                            headers={"Cache-Control": IMMUTABLE})

    async def get_head(self, request: web.Request) -> web.Response:
        cluster, name, index = self._db(request)
        try:
            wait = min(MAX_WAIT, max(0.0, float(request.query.get("wait", "0"))))
        except ValueError:
            raise _BadRequest(f"wait {request.query['wait']!r}: want seconds") from None
        known = request.headers.get("If-None-Match")
        head, tag = self._latest(cluster, name, index)
        if known == tag and wait > 0:
            def changed() -> bool:
                if self.stopping.is_set() or not self.engine.exists(cluster, name):
                    return True
                return self._latest(cluster, name, self.engine.index(cluster, name))[1] != tag
            async def held() -> None:
                async with self.engine.stored:
                    await self.engine.stored.wait_for(changed)
            # Until a change, `wait`, or the client going away (aiohttp would leave the poll waiting for nobody).
            protocol = request.transport.get_protocol() if request.transport is not None else None
            lost = protocol.lost() if isinstance(protocol, Guard) else asyncio.get_running_loop().create_future()
            waiting = asyncio.ensure_future(held())
            try:
                await asyncio.wait([waiting, lost], timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            finally:
                waiting.cancel()
                await asyncio.wait([waiting])
            if lost.done():
                raise ConnectionResetError("the client went away during a long-poll")
            if not waiting.cancelled():
                waiting.result()
            if not self.engine.exists(cluster, name):
                raise _NoDatabase(f"database {name!r} was deleted")
            head, tag = self._latest(cluster, name, self.engine.index(cluster, name))
        if known == tag:
            return web.Response(status=304, headers={"ETag": tag})
        if head is None:
            raise RestoreError(f"database {name!r} has no restorable state yet")
        located = await self._located(f"{cluster}/{name}", head.plan)
        return web.Response(body=heads.encode(located), content_type="application/json",
                            headers={"ETag": tag, "Cache-Control": "no-store"})


class _BadRequest(SidecarError):
    code = "EBADREQUEST"
    http_status = 400


class _NoDatabase(SidecarError):
    code = "ENODB"
    http_status = 404


class _Gone(SidecarError):
    code = "ENOTFOUND"
    http_status = 404


def _hex(query: Mapping[str, str], name: str) -> int | None:
    text = query.get(name)
    if not text:
        return None
    value = hex_txid(text)
    if value is None:  # not looked for as it might parse: a TXID of -1
        raise _BadRequest(f"{name} {text!r}: want a hex TXID (up to 16 hex digits)")
    return value


def _range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range, None for none; 416 when it lies outside the file."""
    if not header:
        return None
    unit, _, spec = header.partition("=")
    first, dash, last = (part.strip() for part in spec.strip().partition("-"))
    if unit.strip() != "bytes" or not dash or "," in spec or not (first or last) or \
            not all(_digits(part) for part in (first, last) if part):
        raise _BadRange(f"Range {header!r}: want one 'bytes=start-end' range")
    if not first:
        start, end = max(0, size - int(last)), size  # a suffix: the last N bytes
    else:
        start = int(first)
        end = min(size, int(last) + 1) if last else size
    if start >= size or end <= start:
        raise _BadRange(f"Range {header!r} is outside the file's {size} bytes")
    return start, end


def _digits(text: str) -> bool:
    """Whether `text` is a decimal number int() reads: ASCII digits only (str.isdigit() also says yes to '²')."""
    return text.isascii() and text.isdigit()


class _BadRange(SidecarError):
    code = "EBADRANGE"
    http_status = 416


__all__ = ["IMMUTABLE", "MAX_WAIT", "Reads"]
