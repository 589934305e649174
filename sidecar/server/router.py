"""Many server processes over one store: each request reaches the process that writes its cluster.

Every process can take any request. For a cluster's routes, the process that holds the cluster's lease
(engine/lease.py) answers; any other process takes the lease if it is free or expired, or else forwards the request
to the holder's address (written in the lease), streaming the body both ways, never buffering it whole. A
forwarded request carries `Lfsc-Forwarded-By`, and is never forwarded again: if its receiver does not hold the
cluster either (the lease moved meanwhile), it answers 503 with Retry-After, and the client tries again.
Processes on one machine mostly avoid forwarding: a new connection goes to the writer whole (handoff.py).

    client ──▶ any process ──(holds the lease)──▶ answer
                          ──(lease free)────────▶ take it, answer
                          ──(another holds it)──▶ forward to its addr ──▶ answer
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import structlog
from aiohttp import web

from sidecar.engine import Engine
from sidecar.engine.lease import LeaseDoc, NotOwner
from sidecar.errors import SidecarError, StorageError

log = structlog.get_logger("sidecar.server")
T = TypeVar("T")

FORWARDED_HEADER = "Lfsc-Forwarded-By"
HOP = frozenset({"host", "content-length", "transfer-encoding", "connection", "keep-alive", "te", "trailer",
                 "upgrade", "proxy-authorization", "proxy-authenticate"})
PROBE_EVERY = 5.0  # seconds between health checks of a writer that has not yet begun its answer to a forward
PROBE_WITHIN = 10.0  # seconds a writer has to answer its health check, or the forward ends (its process stopped)
DECODED = frozenset({"gzip", "deflate", "br", "zstd"})  # the request Content-Encodings aiohttp's server decodes


class NotHere(NotOwner):
    """Another process writes the cluster and cannot be reached, or the lease moved under a forwarded request."""

    def __init__(self, err: NotOwner, why: str) -> None:
        super().__init__(err.cluster, err.holder, f"{err} ({why}); retry shortly")


class Router:
    """Decides, per request, whether this process answers or forwards; owns the forwarding HTTP session."""

    def __init__(self, engine: Engine, instance_id: str, *, cache_seconds: float = 1.0,
                 on_forward: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_forward = on_forward
        self.instance_id = instance_id
        self.cache_seconds = cache_seconds
        self._session: aiohttp.ClientSession | None = None
        self._probes: aiohttp.ClientSession | None = None  # its own connections: never queued behind forwards
        self._holders: dict[str, tuple[LeaseDoc, float]] = {}  # cluster -> (another's lease, until when trusted)
        self.forwarded = 0

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._probes is not None:
            await self._probes.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(auto_decompress=False, timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=5, sock_read=300))
        return self._session

    async def holder(self, request: web.Request, cluster: str) -> LeaseDoc | None:
        """None if this process answers for `cluster` (taking its lease if free), else the lease of the process to
        forward to. Raises NotHere when neither is possible."""
        doc = await self.writer(cluster)
        if doc is None:
            return None
        if request.headers.get(FORWARDED_HEADER):
            raise NotHere(NotOwner(cluster, doc), "the request was forwarded here already")
        if not doc.addr:
            raise NotHere(NotOwner(cluster, doc), "its writer takes no requests")
        return doc

    def cached(self, cluster: str) -> LeaseDoc | None:
        """Another process's lease on `cluster` as last seen, if seen within `cache_seconds`."""
        cached = self._holders.get(cluster)
        return cached[0] if cached is not None and time.monotonic() < cached[1] else None

    def remember(self, cluster: str, doc: LeaseDoc) -> None:
        """Note another process's live lease on `cluster` (read by the caller), for `cache_seconds`."""
        self._holders[cluster] = (doc, time.monotonic() + self.cache_seconds)

    async def writer(self, cluster: str) -> LeaseDoc | None:
        """None if this process writes `cluster` (taking its lease if free), else the lease of the process that
        does. Raises NotHere when neither is known."""
        if self.engine.owns(cluster):
            return None
        doc = self.cached(cluster)
        if doc is None:
            try:
                await self.engine.own(cluster, provisional=True)
                self._holders.pop(cluster, None)
                return None
            except NotOwner as err:
                if err.holder is None:
                    raise NotHere(err, "its writer is unknown") from None
                doc = err.holder
                self.remember(cluster, doc)
            except StorageError as err:
                raise NotHere(NotOwner(cluster, None), f"the store did not answer: {err}") from None
        return doc

    async def peer(self, cluster: str) -> LeaseDoc | None:
        """Another live process's lease on `cluster` (with an address), without taking the lease; None otherwise."""
        if self.engine.owns(cluster):
            return None
        cached = self.cached(cluster)
        if cached is not None:
            return cached
        try:
            doc, _ = await self.engine.leases.holder(cluster)
        except SidecarError:  # the store did not answer, or its lease object is unreadable: this process's view
            return None
        if doc is None or not self.engine.leases.live(doc) or not doc.addr:
            return None
        self.remember(cluster, doc)
        return doc

    async def fetch(self, request: web.Request, holder: LeaseDoc, path: str) -> Any:
        """GET `path` from another process as the caller (its Authorization), never to be forwarded again; None if
        it does not answer (gone, or stopped: see `forward`) or not with JSON."""
        headers = {FORWARDED_HEADER: self.instance_id}
        if "Authorization" in request.headers:
            headers["Authorization"] = request.headers["Authorization"]
        try:
            async with contextlib.AsyncExitStack() as stack:
                resp = await self._unless_stopped(holder, stack.enter_async_context(
                    self.session().get(holder.addr.rstrip("/") + path, headers=headers)))
                return await resp.json() if resp.status == 200 else None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            log.warning("peer did not answer", to=holder.addr, path=path, error=str(exc))
            return None

    async def forward(self, request: web.Request, cluster: str, holder: LeaseDoc) -> web.StreamResponse:
        """Send the request to the cluster's writer and stream its answer back."""
        # aiohttp decoded a body in these encodings before we read it: it goes on decoded, without its encoding
        drop = HOP | {"content-encoding"} if request.headers.get("Content-Encoding", "").lower() in DECODED else HOP
        headers = {k: v for k, v in request.headers.items() if k.lower() not in drop}
        headers[FORWARDED_HEADER] = self.instance_id
        url = holder.addr.rstrip("/") + request.path_qs
        self.forwarded += 1
        if self.on_forward:
            self.on_forward()
        out: web.StreamResponse | None = None
        try:
            async with contextlib.AsyncExitStack() as stack:
                up = await self._unless_stopped(holder, stack.enter_async_context(self.session().request(
                    request.method, url, headers=headers, data=request.content if request.can_read_body else None)))
                out = web.StreamResponse(status=up.status, headers={
                    k: v for k, v in up.headers.items() if k.lower() not in HOP})
                if up.content_length is not None:
                    out.content_length = up.content_length
                await out.prepare(request)
                async for chunk in up.content.iter_chunked(1 << 16):
                    await out.write(chunk)
                await out.write_eof()
                return out
        except (aiohttp.ClientError, OSError) as exc:
            self._holders.pop(cluster, None)
            log.warning("forward failed", cluster=cluster, to=holder.addr, error=str(exc))
            if out is not None and out.prepared:  # its status and headers are sent: no error answer can follow
                if request.transport is not None:
                    request.transport.close()  # the client sees the answer cut short, never completed by others
                raise ConnectionResetError(f"{holder.addr} stopped mid-answer: {exc}") from None
            raise NotHere(NotOwner(cluster, holder), f"{holder.addr} did not answer: {exc}") from None

    async def _unless_stopped(self, holder: LeaseDoc, answer: Awaitable[T]) -> T:
        """`answer` (the writer's status and headers), unless the writer stops answering its health check first
        (a stopped process's kernel still takes connections, and a live writer may take minutes to receive a large
        body and answer): then TimeoutError."""
        waiting = asyncio.ensure_future(answer)
        probing = asyncio.ensure_future(self._stopped(holder))
        try:
            await asyncio.wait([waiting, probing], return_when=asyncio.FIRST_COMPLETED)
        finally:
            probing.cancel()
            if not waiting.done():
                waiting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await waiting
        if waiting.cancelled():
            raise TimeoutError(f"no answer, and no answer to its health check within {PROBE_WITHIN:g}s")
        return waiting.result()

    async def _stopped(self, holder: LeaseDoc) -> None:
        """Return once the writer at `holder.addr` does not answer its /healthz within PROBE_WITHIN."""
        url = holder.addr.rstrip("/") + "/healthz"
        while True:
            await asyncio.sleep(PROBE_EVERY)
            try:
                if self._probes is None:
                    self._probes = aiohttp.ClientSession()
                async with self._probes.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_WITHIN)) as resp:
                    if resp.status == 200:
                        continue
            except (aiohttp.ClientError, TimeoutError):
                pass
            return


__all__ = ["FORWARDED_HEADER", "NotHere", "Router"]
