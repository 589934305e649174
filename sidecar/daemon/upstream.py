"""Where the sidecar ships: a backup server over the LiteFS Cloud protocol, or an engine in-process.

Both answer the same four questions, in upstream TXIDs:

    await up.positions()            {db: Pos}; a database upstream has never seen is absent
    await up.upload(db, ltx)        the HWM after accepting one contiguous LTX v2 file (PosMismatch if not)
    await up.snapshot(db)           an LTX v2 snapshot (1..N) of upstream's latest state
    await up.hwm(db)                (HWM, Pos) without uploading (replicas poll it)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

import aiohttp

from sidecar.config import EngineConfig
from sidecar.engine import Engine
from sidecar.engine.lease import NotOwner
from sidecar.errors import ConfigError, SidecarError, StorageError, UpstreamError
from sidecar.ltx import Pos, parse_txid
from sidecar.protocol import HWM_HEADER, pos_from_json, positions_from_json, raise_for
from sidecar.storage import open_storage


class Upstream(Protocol):
    url: str
    compress: bool  # LZ4 the uploads (v2 flag), or send them raw

    @property
    def identity(self) -> str:
        """What upstream is: the sidecar's state about it is only good for this upstream."""
        ...

    async def positions(self) -> dict[str, Pos]: ...

    async def upload(self, db: str, data: bytes) -> int: ...

    async def snapshot(self, db: str) -> bytes: ...

    async def hwm(self, db: str) -> tuple[int, Pos]: ...

    async def release(self) -> None: ...

    def failing(self, db: str) -> dict[str, str]:
        """`db`'s jobs an engine in this process runs that are failing now (job -> last error); empty if none, and
        for a server, which shows its own (`/api/databases`, `/metrics`)."""
        ...

    async def close(self, within: float | None = None) -> None:
        """Let go of upstream; what waits for the store waits at most `within` seconds (None: no bound)."""


class HTTPUpstream:
    """A LiteFS Cloud compatible server; the cluster comes from the token (or `--cluster` without auth)."""

    compress = True  # over the network, as LiteFS's own uploads

    def __init__(self, url: str, token: str, cluster: str, *, timeout: float = 60.0) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.cluster = cluster
        self.timeout = timeout  # longest a request may go without progress; a big body on a slow link may take longer
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))

    @property
    def identity(self) -> str:
        return f"{self.url} cluster {self.cluster}"

    def _headers(self) -> dict[str, str]:
        # Without a token the server (in --insecure-no-auth mode) takes the cluster from this header, as lfsb does.
        return {"Authorization": self.token or f"cluster {self.cluster}"}

    async def _request(self, method: str, path: str, db: str | None = None, data: bytes | None = None
                       ) -> tuple[int, dict[str, str], bytes]:
        params = {"db": db} if db is not None else {}
        try:
            async with asyncio.timeout(self.timeout) as deadline:  # moved on by every chunk sent or received
                sent = None if data is None else self._chunks(data, deadline)
                async with self._session.request(method, self.url + path, params=params, data=sent,
                                                 headers=self._headers()) as resp:
                    chunks = []
                    async for chunk in resp.content.iter_any():
                        chunks.append(chunk)
                        self._progress(deadline)
                    body = b"".join(chunks)
                    if resp.status == 200:
                        return resp.status, dict(resp.headers), body
                    raise_for(resp.status, body, db or "", f"{method} {self.url}{path}" + (f"?db={db}" if db else ""))
        except TimeoutError as err:
            raise UpstreamError(0, "ECONN", f"{method} {self.url}{path}: no progress for {self.timeout:g} s") from err
        except (aiohttp.ClientError, OSError) as err:
            raise UpstreamError(0, "ECONN", f"{method} {self.url}{path}: {str(err) or type(err).__name__}") from err
        raise AssertionError("unreachable")

    async def _chunks(self, data: bytes, deadline: asyncio.Timeout) -> AsyncIterator[bytes]:
        """The body in 64 KiB chunks (sent chunked, as LiteFS sends it); each one taken moves the deadline on."""
        for i in range(0, len(data), 1 << 16):
            yield data[i:i + (1 << 16)]
            self._progress(deadline)

    def _progress(self, deadline: asyncio.Timeout) -> None:
        deadline.reschedule(asyncio.get_running_loop().time() + self.timeout)

    async def positions(self) -> dict[str, Pos]:
        _, _, body = await self._request("GET", "/pos")
        try:
            return positions_from_json(body)
        except ValueError as err:
            raise UpstreamError(200, "EBADPOS", f"GET {self.url}/pos: unreadable position map: {err}") from err

    async def upload(self, db: str, data: bytes) -> int:
        _, headers, _ = await self._request("POST", "/db/tx", db, data)
        try:
            return parse_txid(headers[HWM_HEADER])
        except (KeyError, ValueError) as err:
            raise UpstreamError(200, "EBADHWM", f"POST {self.url}/db/tx?db={db}: no valid Litefs-Hwm header") from err

    async def snapshot(self, db: str) -> bytes:
        return (await self._request("GET", "/db/snapshot", db))[2]

    async def hwm(self, db: str) -> tuple[int, Pos]:
        body = (await self._request("GET", "/db/hwm", db))[2]
        try:
            doc = json.loads(body)
            return parse_txid(doc["hwm"]), pos_from_json(doc)
        except (ValueError, KeyError, TypeError) as err:
            raise UpstreamError(200, "EBADHWM", f"GET {self.url}/db/hwm?db={db}: {err}") from err

    async def release(self) -> None:
        return None  # the server decides who writes

    def failing(self, db: str) -> dict[str, str]:
        return {}

    async def close(self, within: float | None = None) -> None:
        await self._session.close()


class EngineUpstream:
    """The backup engine in this process, on `file://ROOT` or `s3://bucket/prefix`: `ROOT/<cluster>/<db>`."""

    compress = False  # the bytes never leave this process: the engine would undo LZ4 at once

    def __init__(self, url: str, engine: Engine, cluster: str) -> None:
        self.url = url
        self.engine = engine
        self.cluster = cluster
        self._stop = asyncio.Event()
        # The engine's own jobs (flushes, compactions, retention, lease renewals) run only while this sidecar writes
        # the cluster: on a replica its ticker would take a free lease to compact, writing the store and keeping the
        # primary's sidecar out for a lease TTL.
        self._ticker: asyncio.Task[None] | None = None
        self._told = False  # whether the sidecar was given the error the ticker ended with

    @classmethod
    async def open(cls, url: str, cluster: str, state_dir: Path, config: EngineConfig) -> EngineUpstream:
        storage = open_storage(url, endpoint_url=config.s3_endpoint or None, region=config.s3_region or None,
                               force_path_style=config.s3_force_path_style or None)
        try:
            engine = await Engine.from_config(storage, config, state_dir)
        except BaseException:
            await storage.close()  # a store refused at start (say, one ignoring conditional writes) leaks no session
            raise
        return cls(url, engine, cluster)

    @property
    def identity(self) -> str:
        return f"{self.url} store {self.engine.store_id} cluster {self.cluster}"

    def _stopped(self) -> SidecarError | None:
        """Why the engine's loop (flushes, compaction, leases) ended, if it ended with an error."""
        t = self._ticker
        if t is None or not t.done() or t.cancelled() or (err := t.exception()) is None:
            return None
        while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:  # its TaskGroup's one error
            err = err.exceptions[0]
        stopped = SidecarError(f"{self.url}: engine stopped: {err}")
        stopped.__cause__ = err
        return stopped

    async def _own(self) -> None:
        """Only the holder of the cluster's lease ships (another sidecar may hold it during a failover). Raises
        SidecarError once the engine's loop has ended with an error: nothing accepted would reach the store any
        more, so the sidecar stops with why, for its supervisor to restart it (as `serve` does)."""
        if (stopped := self._stopped()) is not None:
            self._told = True
            raise stopped
        try:
            await self.engine.own(self.cluster)
        except NotOwner as err:
            raise UpstreamError(503, err.code, f"{self.url}: {err}; waiting for it to be let go or to expire") from err
        except StorageError as err:  # the store cannot be reached to take the lease: retried, as `serve`'s 503 is
            raise UpstreamError(err.http_status, err.code, f"{self.url}: {err}") from err
        if self._ticker is None or self._ticker.done():  # or stopped by a release that was then cut short
            self._stop = asyncio.Event()
            self._ticker = asyncio.create_task(self.engine.run(self._stop), name="engine ticker")

    async def _stop_ticker(self) -> None:
        """Stop the engine's jobs; one that ended with an error is kept, for `_own` and `close` to say why."""
        if self._ticker is not None:
            self._stop.set()
            await asyncio.wait([self._ticker])
            if self._stopped() is None:
                self._ticker = None

    async def positions(self) -> dict[str, Pos]:
        await self._own()
        return self.engine.positions(self.cluster)

    async def upload(self, db: str, data: bytes) -> int:
        await self._own()
        try:
            return await self.engine.write_tx(self.cluster, db, data)
        except NotOwner as err:
            raise UpstreamError(503, err.code, f"{self.url}: {err}") from err

    async def snapshot(self, db: str) -> bytes:
        await self._own()
        with self.engine.tmp("sidecar-snapshot-") as tmp:
            out = Path(tmp) / "snapshot.ltx"
            await self.engine.snapshot_file(self.cluster, db, out)
            return await asyncio.to_thread(out.read_bytes)

    async def release(self) -> None:
        """This node is no longer the primary: store what is pending, and let the new primary's sidecar write."""
        await self._stop_ticker()
        await self.engine.release(self.cluster)

    def failing(self, db: str) -> dict[str, str]:
        return self.engine.status(self.cluster, db).failing if self.engine.exists(self.cluster, db) else {}

    async def hwm(self, db: str) -> tuple[int, Pos]:
        await self.engine.refresh(self.cluster, db)  # a replica's engine writes nothing: the store says
        return self.engine.hwm(self.cluster, db), self.engine.pos(self.cluster, db)

    async def close(self, within: float | None = None) -> None:
        await self._stop_ticker()
        await self.engine.close(within=within)  # what the store does not take stays in the upload log
        await self.engine.storage.close()
        if (stopped := self._stopped()) is not None and not self._told:
            raise stopped


async def open_upstream(url: str, *, cluster: str, token: str, state_dir: Path, engine: EngineConfig) -> Upstream:
    """The upstream for `url`: http(s):// → a backup server; file:// or s3:// → an engine in-process.

    `engine.l0_interval` is 1 s by default for file:// (one L0 file a second: see `config.load`), so every second
    of the sidecar's uploads is a restore point.
    """
    scheme = urlsplit(url).scheme
    if scheme in ("http", "https"):
        return HTTPUpstream(url, token, cluster)
    if scheme in ("file", "s3"):
        # The CLI sets engine.state_dir (`<sidecar.state_dir>/engine` unless given: config.load); a caller that
        # left the class default gets the same place under its own state directory.
        own = engine.state_dir != EngineConfig.__dataclass_fields__["state_dir"].default
        return await EngineUpstream.open(url, cluster, engine.state_dir if own else state_dir / "engine", engine)
    raise ConfigError([f"sidecar.upstream = {url!r}: scheme must be http, https, file or s3"])


__all__ = ["EngineUpstream", "HTTPUpstream", "Upstream", "open_upstream"]
