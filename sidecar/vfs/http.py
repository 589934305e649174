"""A backup read through the server (`sidecar.server.reads`) with a token: no bucket credentials needed.

URL: `http(s)://host:port/<db>` (`?cluster=NAME` with the admin token). Plans come from the server's
in-memory index (no LIST, no header reads) with each file's page index located. Pages come resolved by
the server (`pages`: one request per miss, neighbours included), or, for a reader that resolves them
itself, as `Range`s of the stored files (cacheable by a CDN). Following is one long-poll per change.
GETs are retried on connection errors and 5xx with backoff; a refusal keeps its type: `RestoreError` for
ENOTXID, `NotFound` for a deleted file.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import aiohttp

from sidecar.engine import head as heads
from sidecar.engine.head import Head
from sidecar.engine.index import FileEntry
from sidecar.errors import ConfigError, NotFound, RestoreError, UpstreamError
from sidecar.ltx import format_filename, format_timestamp
from sidecar.vfs.stats import Stats

ATTEMPTS = 4
_PAGE = struct.Struct(">IBQQ")  # /db/pages: pgno, and the level, min and max TXID of the frame's file


class ServerSource:
    """One database on a backup server."""

    def __init__(self, url: str, *, token: str = "") -> None:
        parsed = urlparse(url)
        db = parsed.path.strip("/")
        if not db or "/" in db:
            raise ConfigError([f"backup server URL {url!r}: want http(s)://host:port/<db>"])
        self.url = url
        self.base = f"{parsed.scheme}://{parsed.netloc}"
        self.params = {"db": db}
        cluster = parse_qs(parsed.query).get("cluster")
        if cluster:
            self.params["cluster"] = cluster[0]
        self.stats = Stats()
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    def key(self, entry: FileEntry) -> str:
        return f"{entry.level}/{format_filename(entry.min_txid, entry.max_txid)}"

    async def plan(self, *, txid: int | None = None, timestamp: int | None = None,
                   after: int | None = None, listed: bool = False) -> Head:
        # `listed` changes nothing: the server plans from its index of the stored files, never a head object.
        q: dict[str, str] = {}
        if txid is not None:
            q["txid"] = f"{txid:016x}"
        if timestamp is not None:
            q["timestamp"] = format_timestamp(timestamp)
        if after is not None:
            q["after"] = f"{after:016x}"
        _, body, _ = await self._get("/db/plan", q)
        return self._decode(body)

    async def read(self, key: str, start: int, length: int) -> bytes:
        if length <= 0:
            return b""
        status, body, _ = await self._get("/db/ltx", {"file": key}, {"Range": f"bytes={start}-{start + length - 1}"},
                                          file=key)
        if status == 200:  # a cache or proxy on the way ignored the Range: the whole file came
            return body[start:start + length]
        return body

    async def pages(self, txid: int, pgno: int, count: int, checksum: int = 0) -> list[tuple[int, str, bytes]]:
        q = {"txid": f"{txid:016x}", "pgno": str(pgno), "count": str(count)}
        if checksum:
            q["checksum"] = f"{checksum:016x}"
        try:
            _, body, _ = await self._get("/db/pages", q)
        except RestoreError as err:
            raise NotFound(f"TXID {txid:016x}", f"no longer readable: {err}") from None
        out = []
        pos = 0
        while pos < len(body):
            if pos + _PAGE.size + 10 > len(body):
                raise UpstreamError(200, "EBADPAGES", f"{self.url}: /db/pages answer cut short at byte {pos}")
            p, level, lo, hi = _PAGE.unpack_from(body, pos)
            pos += _PAGE.size
            end = pos + 10 + int.from_bytes(body[pos + 6:pos + 10], "big")
            out.append((p, f"{level}/{format_filename(lo, hi)}", body[pos:end]))
            pos = end
        return out

    async def download(self, key: str, path: Path) -> None:
        await self._get("/db/ltx", {"file": key}, file=key, into=path)

    async def follow(self, tag: str | None, wait: float) -> tuple[Head, str] | None:
        headers = {"If-None-Match": tag} if tag else {}
        self.stats.polls += 1
        status, body, etag = await self._get("/db/head", {"wait": f"{wait:g}"}, headers, seconds=wait + 30)
        if status == 304:
            return None
        return self._decode(body), etag

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- plumbing -------------------------------------------------------------------------------------

    def _decode(self, body: bytes) -> Head:
        try:
            return heads.decode(body)
        except ValueError as err:
            raise UpstreamError(200, "EBADPLAN", f"{self.url}: invalid plan: {err}") from None

    async def _get(self, path: str, query: Mapping[str, str], headers: Mapping[str, str] | None = None, *,
                   file: str | None = None, seconds: float = 60.0, into: Path | None = None) -> tuple[int, bytes, str]:
        """GET with retries; returns (status, body, ETag). 200, 206 and 304 are answers; the rest raise.
        With `into`, a 200's body is streamed to that file (temp file, then rename) and not returned."""
        if self._session is None:
            self._session = aiohttp.ClientSession(headers=self._headers)
        url = f"{self.base}{path}"
        params = {**self.params, **query}
        attempt = 0
        while True:
            attempt += 1
            self.stats.requests += 1
            try:
                timeout = aiohttp.ClientTimeout(total=None if into else seconds, sock_read=seconds)
                async with self._session.get(url, params=params, headers=headers, timeout=timeout) as resp:
                    if into is not None and resp.status == 200:
                        await self._save(resp, into)
                        return resp.status, b"", resp.headers.get("ETag", "")
                    body = await resp.read()
                    self.stats.bytes += len(body)
                    if resp.status in (200, 206, 304):
                        return resp.status, body, resp.headers.get("ETag", "")
                    err = _refusal(resp.status, body, f"{self.url}: GET {path}", file)
            except (aiohttp.ClientError, TimeoutError) as exc:
                err = UpstreamError(0, "ECONNECTION", f"{self.url}: GET {path}: {type(exc).__name__}: {exc}")
            if not getattr(err, "retryable", False) or attempt >= ATTEMPTS:
                raise err
            await asyncio.sleep(random.uniform(0, 0.2 * 2 ** attempt))


    async def _save(self, resp: aiohttp.ClientResponse, path: Path) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            with open(tmp, "wb") as f:
                async for chunk in resp.content.iter_chunked(1 << 20):
                    self.stats.bytes += len(chunk)
                    await asyncio.to_thread(f.write, chunk)
            tmp.replace(path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def _refusal(status: int, body: bytes, what: str, file: str | None) -> Exception:
    """The server's JSON error `{code, error}` as our own exception type."""
    try:
        doc: Any = json.loads(body)
        code, message = str(doc.get("code", "")), str(doc.get("error", ""))
    except (ValueError, AttributeError):
        code, message = "", body[:200].decode(errors="replace")
    if code == "ENOTXID":
        return RestoreError(message)
    if code == "ENOTFOUND" and file is not None:
        return NotFound(file, message)
    return UpstreamError(status, code or str(status), f"{what}: {message}")


__all__ = ["ServerSource"]
