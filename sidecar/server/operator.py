"""The operator API (JSON): list, restore as a new head, download, upload, clone, delete.

    GET    /api/databases                     clusters and databases: position, HWM, lag, size, restore points
    GET    /api/db?db=NAME                    one database, with its restore points on every level
    POST   /api/restore?db=NAME               {"timestamp": RFC 3339} or {"txid": hex}: append that state as head
    GET    /api/download?db=NAME[&timestamp=|&txid=][&format=sqlite|ltx]
    GET    /api/preview?db=NAME(&timestamp=|&txid=)  what a restore would bring back: tables and row counts
    POST   /api/upload?db=NAME                body: a SQLite file, appended as the new head
    POST   /api/clone?db=NAME&to_cluster=C[&to_db=N]
    DELETE /api/db?db=NAME

A cluster token sees and changes only its own cluster; the admin token (`?cluster=` to choose) all.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path
from typing import Any

from aiohttp import web

from sidecar.engine import Engine
from sidecar.engine.index import chain
from sidecar.engine.restore import check_integrity
from sidecar.errors import InvalidDatabaseName, RestoreError, validate_cluster_name, validate_db_name
from sidecar.ltx import LTXError, format_timestamp
from sidecar.ltx.sqlite import sqlite_page_size
from sidecar.protocol import hex_txid, txid_hex
from sidecar.server.http import ADMIN, CLUSTER, ClientError, Quota, db_param, read_body
from sidecar.server.litefs_api import MAX_SNAPSHOTS, send_snapshot
from sidecar.server.router import FORWARDED_HEADER, Router
from sidecar.storage.base import parse_rfc3339


def describe_tables(path: Path) -> list[dict[str, Any]]:
    """Each table of a SQLite file, with its row count (read-only; the file is a private temporary copy). A table
    this SQLite cannot read (a virtual table of a module it lacks, such as sqlite-vec's vec0) has rows None."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        names = [r[0] for r in con.execute(
            "SELECT name FROM sqlite_schema WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
            "ORDER BY name")]
        out: list[dict[str, Any]] = []
        for n in names:
            try:
                rows = con.execute(f'SELECT count(*) FROM "{n.replace(chr(34), chr(34) * 2)}"').fetchone()[0]
            except sqlite3.Error:
                rows = None
            out.append({"name": n, "rows": rows})
        return out
    finally:
        con.close()


def _target(params: Any, *, required: bool = False) -> tuple[int | None, int | None]:
    """(txid, timestamp ms) from `txid` (16 hex digits) or `timestamp` (RFC 3339); 400 naming the field if bad."""
    ts = params.get("timestamp") or None
    txid = params.get("txid") or None
    if ts and txid:
        raise ClientError(400, "EBADTARGET", "give timestamp or txid, not both")
    if required and not (ts or txid):
        raise ClientError(400, "EBADTARGET", "give a timestamp (RFC 3339) or a txid (16 hex digits)")
    if txid is not None and hex_txid(txid) is None:
        raise ClientError(400, "EBADTARGET", f"txid: want up to 16 hex digits as a string, got {txid!r}")
    if ts is not None:
        try:
            if not isinstance(ts, str):
                raise ValueError("not a string")
            return (int(txid, 16) if txid else None), parse_rfc3339(ts)
        except (ValueError, OverflowError) as err:
            raise ClientError(400, "EBADTARGET", f"timestamp: want RFC 3339 such as 2026-11-24T09:00:00Z, got "
                                                 f"{ts!r} ({err})") from None
    return (int(txid, 16) if txid else None), None


class OperatorAPI:
    """Handlers of /api/... over one engine."""

    def __init__(self, engine: Engine, *, max_body_size: int, request_timeout: float,
                 router: Router | None = None, receiving: Quota | None = None,
                 snapshots: Quota | None = None) -> None:
        self.engine = engine
        self.router = router
        self.max_body_size = max_body_size
        self.request_timeout = request_timeout
        self.receiving = receiving or Quota(max_body_size, "bytes of uploads in flight")
        self.snapshots = snapshots or Quota(MAX_SNAPSHOTS, "snapshot downloads under way")

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/api/databases", self.list_databases)
        r.add_get("/api/db", self.get_db)
        r.add_delete("/api/db", self.delete_db)
        r.add_post("/api/restore", self.restore)
        r.add_get("/api/download", self.download)
        r.add_get("/api/preview", self.preview)
        r.add_post("/api/upload", self.upload)
        r.add_post("/api/clone", self.clone)

    def _existing(self, request: web.Request) -> tuple[str, str]:
        """The requested database; 404 ENODB if the server has never seen it."""
        cluster, name = db_param(request)
        if not self.engine.exists(cluster, name):
            raise ClientError(404, "ENODB", f"no database {name!r} in cluster {cluster!r}")
        return cluster, name

    def _describe(self, cluster: str, name: str, points: bool = False) -> dict[str, Any]:
        st = self.engine.status(cluster, name)
        out: dict[str, Any] = {
            "cluster": cluster, "name": name, "txid": txid_hex(st.pos.txid),
            "postApplyChecksum": f"{st.pos.post_apply_checksum:016x}", "hwm": txid_hex(st.hwm),
            "lag": st.pos.txid - st.hwm, "size": st.stored_bytes, "files": st.files,
            "lastUpload": st.last_upload or None, "failing": st.failing}
        rp = self.engine.restore_points(cluster, name)
        out["restorePoints"] = len(rp)
        if rp:
            out["oldest"] = format_timestamp(rp[0][1])
            out["newest"] = format_timestamp(rp[-1][1])
        if points:
            out["points"], out["levels"] = self._points_by_level(cluster, name)
        return out

    def _points_by_level(self, cluster: str, name: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Every restore point of every level (a TXID that two levels both end at is listed under each), and per
        level the stretch of time it covers and how far apart its points are (`interval`, seconds; 0 = every
        upload): which stretch is restorable at which granularity."""
        index = self.engine.index(cluster, name)
        reach = set(chain(index)[0])
        points: list[dict[str, Any]] = []
        levels: list[dict[str, Any]] = []
        for level in sorted(index.levels):
            mine = [e for e in index.level(level) if e in reach]
            if not mine:
                continue
            points += [{"txid": txid_hex(e.max_txid), "timestamp": format_timestamp(e.timestamp), "level": level}
                       for e in mine]
            try:
                interval: float | None = self.engine.levels.interval(level)
            except KeyError:  # a level we do not build (a Litestream store's L3..L8)
                interval = None
            levels.append({"level": level, "points": len(mine), "interval": interval,
                           "oldest": format_timestamp(min(e.timestamp for e in mine)),
                           "newest": format_timestamp(max(e.timestamp for e in mine))})
        points.sort(key=lambda p: (p["txid"], p["level"]))
        return points, levels

    async def list_databases(self, request: web.Request) -> web.Response:
        cluster = request[CLUSTER]
        if cluster != "*":
            return web.json_response({"clusters": [self._cluster(cluster)]})
        out = []
        for c in await self.engine.all_clusters():
            # Every cluster, each as the process that writes it sees it (its pending uploads are there only).
            found = None
            if self.router is not None and not request.headers.get(FORWARDED_HEADER):
                holder = await self.router.peer(c)
                if holder is not None:
                    found = await self.router.fetch(request, holder, f"/api/databases?cluster={c}")
            out.append(found["clusters"][0] if found and found.get("clusters") else self._cluster(c))
        return web.json_response({"clusters": out})

    def _cluster(self, cluster: str) -> dict[str, Any]:
        return {"name": cluster, "databases": [self._describe(cluster, n) for n in self.engine.databases(cluster)]}

    async def get_db(self, request: web.Request) -> web.Response:
        cluster, name = self._existing(request)
        return web.json_response(self._describe(cluster, name, points=True))

    async def delete_db(self, request: web.Request) -> web.Response:
        cluster, name = self._existing(request)
        n = await self.engine.delete_database(cluster, name)
        return web.json_response({"deleted": n})

    async def restore(self, request: web.Request) -> web.Response:
        cluster, name = self._existing(request)
        try:
            body = json.loads(await read_body(request, 1 << 16, self.request_timeout) or b"{}")
        except ValueError:
            raise ClientError(400, "EBADJSON", 'body: want a JSON object such as {"timestamp": '
                                               '"2026-11-24T09:00:00Z"}') from None
        if not isinstance(body, dict):
            raise ClientError(400, "EBADJSON", "body: want a JSON object")
        txid, ts = _target(body, required=True)
        with self.engine.tmp("api-") as tmp:
            db = Path(tmp) / "db"
            result = await self.engine.restore_to(cluster, name, db, txid=txid, timestamp=ts, integrity_check=True)
            pos = await self.engine.write_state(cluster, name, db)
        return web.json_response({"restored": {"txid": txid_hex(result.txid),
                                               "timestamp": format_timestamp(result.timestamp)},
                                  "txid": txid_hex(pos.txid), "postApplyChecksum": f"{pos.post_apply_checksum:016x}"})

    async def preview(self, request: web.Request) -> web.Response:
        """Restore the target into a temporary file and describe it: the restore page shows this before asking."""
        cluster, name = self._existing(request)
        txid, ts = _target(request.query, required=True)
        with self.engine.tmp("preview-") as tmp:
            db = Path(tmp) / "db"
            result = await self.engine.restore_to(cluster, name, db, txid=txid, timestamp=ts, integrity_check=True)
            tables = await asyncio.to_thread(describe_tables, db)
        return web.json_response({"restored": {"txid": txid_hex(result.txid),
                                               "timestamp": format_timestamp(result.timestamp)},
                                  "tables": tables, "size": result.pages * result.page_size})

    async def download(self, request: web.Request) -> web.StreamResponse:
        cluster, name = self._existing(request)
        txid, ts = _target(request.query)
        fmt = request.query.get("format", "sqlite")
        if fmt not in ("sqlite", "ltx"):
            raise ClientError(400, "EBADFORMAT", f"format {fmt!r}: want sqlite or ltx")
        with self.snapshots.hold(cluster, f"download of {name!r}", 1):
            return await send_snapshot(self.engine, request, cluster, name, timestamp=ts, txid=txid,
                                       sqlite=fmt == "sqlite", within=self.request_timeout)

    async def upload(self, request: web.Request) -> web.Response:
        cluster, name = db_param(request)
        with self.receiving.hold(cluster, f"upload of {name!r}") as take:  # its bytes are held until stored
            return await self._upload(request, cluster, name,
                                      await read_body(request, self.max_body_size, self.request_timeout, take))

    async def _upload(self, request: web.Request, cluster: str, name: str, data: bytes) -> web.Response:
        try:
            page_size = sqlite_page_size(data[:100])
        except LTXError as err:
            raise ClientError(422, "ENOTSQLITE", f"upload of {name!r}: body is not a SQLite database ({err})") from None
        if len(data) % page_size:
            raise ClientError(422, "ENOTSQLITE", f"upload of {name!r}: size {len(data)} is not a multiple of its page "
                                                 f"size {page_size}")
        with self.engine.tmp("api-") as tmp:
            db = Path(tmp) / "db"
            db.write_bytes(data)
            try:  # it becomes the head LiteFS nodes pull: a damaged file (half a copy) is refused here
                await asyncio.to_thread(check_integrity, db, "the uploaded database")
            except RestoreError as err:
                raise ClientError(422, "ENOTSQLITE", f"upload of {name!r}: {err}") from None
            pos = await self.engine.write_state(cluster, name, db)
        return web.json_response({"txid": txid_hex(pos.txid), "postApplyChecksum": f"{pos.post_apply_checksum:016x}"})

    async def clone(self, request: web.Request) -> web.Response:
        cluster, name = self._existing(request)
        to_cluster = request.query.get("to_cluster", "")
        to_db = request.query.get("to_db") or name
        if not to_cluster:
            raise ClientError(400, "EBADDB", "missing ?to_cluster=<cluster to clone into>")
        for field, value, validate in (("to_cluster", to_cluster, validate_cluster_name),
                                       ("to_db", to_db, validate_db_name)):
            try:
                validate(value)
            except InvalidDatabaseName as err:
                raise ClientError(400, "EBADDB", f"{field}: {err}") from None
        if not request.get(ADMIN) and to_cluster != cluster:
            raise ClientError(401, "EINVALIDAUTH", f"token does not grant cluster {to_cluster!r}")
        if (to_cluster, to_db) == (cluster, name):
            raise ClientError(400, "EBADTARGET", f"clone of {cluster}/{name} onto itself: give another to_cluster "
                                                 "or to_db")
        pos = await self.engine.clone(cluster, name, to_cluster, to_db)
        return web.json_response({"cluster": to_cluster, "name": to_db, "txid": txid_hex(pos.txid)})


__all__ = ["OperatorAPI", "describe_tables"]
