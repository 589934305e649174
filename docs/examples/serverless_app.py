"""A scale-to-zero web app reading a LiteFS database through litefs-sidecar's backup server (docs/serverless.md).

It holds no database file, no LiteFS and no bucket credentials: only the server's URL and a read-only token.
At start it opens the backup with the VFS, following the latest state (one long-poll per change); each
request reads the pages it needs, from the page cache or by ranged reads. `?at=<RFC 3339 time>` reads the
database as it was then.

    LITEFS_SIDECAR_URL=http://backup-host:20203/app.db LITEFS_SIDECAR_TOKEN=<read token> python app.py

Cloud Run and Fly Machines start it on the first request (it listens on $PORT) and stop it when idle.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from sidecar.errors import SidecarError
from sidecar.storage.base import parse_rfc3339
from sidecar.vfs import BackupVFS

VFS = web.AppKey("vfs", BackupVFS)
URL = web.AppKey("url", str)


def make_app(url: str, token: str) -> web.Application:
    """The app for the backup at `url` (`http(s)://host:port/<db>`), read with `token`."""
    app = web.Application()
    app[URL] = url

    async def backup(app: web.Application) -> AsyncIterator[None]:
        vfs = BackupVFS(token=token)  # one per process: its event loop thread, page cache and follower
        app[VFS] = vfs
        # Held open for the instance's life: it keeps the follower (and so the newest state) warm, and
        # each request's own connection then opens without a request to the server.
        keep = await asyncio.to_thread(vfs.connect, url, follow=True)
        yield
        await asyncio.to_thread(keep.close)
        await asyncio.to_thread(vfs.close)

    app.cleanup_ctx.append(backup)
    app.router.add_get("/", status)
    app.router.add_get("/events/{id}", event)
    return app


def read(vfs: BackupVFS, url: str, at: int | None, *statements: tuple[str, tuple[Any, ...]]) -> list[Any]:
    """Run `statements` in one read transaction (one TXID) on a connection of their own, in a worker thread:
    a page the cache lacks is a network read, which must not block the event loop."""
    con = vfs.connect(url, timestamp=at) if at is not None else vfs.connect(url, follow=True)
    try:
        with con:  # BEGIN … COMMIT: every statement sees the same state
            return [[tuple(r) for r in con.execute(sql, args)] for sql, args in statements]
    finally:
        con.close()


async def status(request: web.Request) -> web.Response:
    """The state this instance reads: TXID, its time, how stale it may be, and the number of events."""
    (count,), (txid,), (ts,), (lag,) = [rows[0] for rows in await asyncio.to_thread(
        read, request.app[VFS], request.app[URL], None, ("SELECT count(*) FROM events", ()),
        ("PRAGMA litefs_txid", ()), ("PRAGMA litefs_timestamp", ()), ("PRAGMA litefs_lag", ()))]
    return web.json_response({"txid": txid, "timestamp": ts, "lag_seconds": float(lag), "events": count})


async def event(request: web.Request) -> web.Response:
    """One event, now or `?at=` a past time."""
    try:
        event_id = int(request.match_info["id"])
        at = parse_rfc3339(request.query["at"]) if "at" in request.query else None
    except ValueError:
        return web.json_response({"error": "want /events/<integer id>[?at=<RFC 3339 time>]"}, status=400)
    try:
        rows, ((txid,),) = await asyncio.to_thread(
            read, request.app[VFS], request.app[URL], at, ("SELECT id, at, body FROM events WHERE id = ?", (event_id,)),
            ("PRAGMA litefs_txid", ()))
    except SidecarError as err:  # e.g. a time before the oldest restore point
        return web.json_response({"error": str(err)}, status=404)
    if not rows:
        return web.json_response({"error": f"no event {event_id}", "txid": txid}, status=404)
    (event_id, when, body), = rows
    return web.json_response({"id": event_id, "at": when, "body": body, "txid": txid})


if __name__ == "__main__":
    web.run_app(make_app(os.environ["LITEFS_SIDECAR_URL"], os.environ["LITEFS_SIDECAR_TOKEN"]),
                port=int(os.environ.get("PORT", "8080")))
