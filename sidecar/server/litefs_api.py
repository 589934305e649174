"""The LiteFS Cloud protocol, as a LiteFS node's backup client speaks it (docs/litefs.md §9).

    GET  /pos                      {db: {"txid", "postApplyChecksum"}} for the caller's cluster
    POST /db/tx?db=NAME            an LTX v2 upload (chunked); 200 with Litefs-Hwm, or 409 EPOSMISMATCH
    GET  /db/snapshot?db=NAME      an LTX v2 snapshot of the stored state
    GET  /db/hwm?db=NAME           extension: {"hwm", "txid", "postApplyChecksum"}, polled by replica sidecars
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from urllib.parse import quote

from aiohttp import web

from sidecar.engine import Engine
from sidecar.errors import PosMismatch
from sidecar.ltx import HEADER_SIZE, Header, LTXError
from sidecar.protocol import HWM_HEADER, TXID_HEADER, pos_to_json, txid_hex
from sidecar.server.http import (
    CLUSTER,
    ClientError,
    Quota,
    check_length,
    db_param,
    error,
    read_body,
    read_head,
    send,
)
from sidecar.server.metrics import Metrics

MAX_SNAPSHOTS = 4  # snapshot downloads one cluster may have at once: each holds a temporary file of its database's size


class LiteFSAPI:
    """Handlers of the protocol routes over one engine."""

    def __init__(self, engine: Engine, metrics: Metrics, *, max_body_size: int, request_timeout: float,
                 receiving: Quota | None = None, snapshots: Quota | None = None) -> None:
        self.engine = engine
        self.metrics = metrics
        self.max_body_size = max_body_size
        self.receiving = receiving or Quota(max_body_size, "bytes of uploads in flight")
        self.snapshots = snapshots or Quota(MAX_SNAPSHOTS, "snapshot downloads under way")
        self.request_timeout = request_timeout
        self.inflight = 0

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/pos", self.get_pos)
        r.add_post("/db/tx", self.post_tx)
        r.add_get("/db/snapshot", self.get_snapshot)
        r.add_get("/db/hwm", self.get_hwm)

    async def get_pos(self, request: web.Request) -> web.Response:
        cluster = request[CLUSTER]
        if cluster == "*":
            raise ClientError(400, "ENOCLUSTER", "the admin token needs ?cluster=<cluster> on /pos")
        return web.json_response({name: pos_to_json(pos) for name, pos in self.engine.positions(cluster).items()})

    async def post_tx(self, request: web.Request) -> web.Response:
        cluster, name = db_param(request)
        if self.engine.busy(cluster, name):  # refused before its body is read
            raise PosMismatch(name, self.engine.pos(cluster, name), "another upload of this database is in progress")
        self.inflight += 1
        try:
            # The header first: a refusal it already earns costs no body (a 409 before the pages are sent).
            check_length(request, self.max_body_size)
            head = await read_head(request, HEADER_SIZE, self.request_timeout)
            if not head:
                raise LTXError("empty request body: want an LTX file")
            try:
                header = Header.unpack(head)
            except LTXError as err:
                raise LTXError(f"{cluster}/{name}: invalid LTX upload: {err}", field=err.field) from err
            self.engine.precheck(cluster, name, header)
            with self.receiving.hold(cluster, f"upload of {name!r}") as take:  # until accepted (then pending)
                take(len(head))
                data = head + await read_body(request, self.max_body_size, self.request_timeout, take,
                                              read=len(head))
                hwm = await self.engine.write_tx(cluster, name, data)
        finally:
            self.inflight -= 1
        self.metrics.accepted(cluster, len(data))
        return web.Response(status=200, headers={HWM_HEADER: txid_hex(hwm)})

    async def get_snapshot(self, request: web.Request) -> web.StreamResponse:
        cluster, name = db_param(request)
        if not self.engine.exists(cluster, name) or self.engine.pos(cluster, name).is_zero:
            return error(404, "ENODB", f"database {name!r} has no backup in cluster {cluster!r}")
        with self.snapshots.hold(cluster, f"download of {name!r}", 1):
            return await send_snapshot(self.engine, request, cluster, name, within=self.request_timeout)

    async def get_hwm(self, request: web.Request) -> web.Response:
        cluster, name = db_param(request)
        pos = self.engine.pos(cluster, name)
        return web.json_response({"hwm": txid_hex(self.engine.hwm(cluster, name)), **pos_to_json(pos)})


def attachment(name: str) -> str:
    """A Content-Disposition naming the download after a database whatever its characters (RFC 6266): an ASCII
    fallback, then the exact name percent-encoded as UTF-8."""
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in name)
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def send_snapshot(engine: Engine, request: web.Request, cluster: str, name: str, *,
                        timestamp: int | None = None, txid: int | None = None,
                        sqlite: bool = False, within: float = 300.0) -> web.StreamResponse:
    """Stream the database at a target: an LTX v2 snapshot, or (`sqlite`) the SQLite file itself. It is built in a
    temporary file held until the client has it all: callers bound how many run at once (MAX_SNAPSHOTS), and the
    client must take each chunk `within` seconds."""
    with engine.tmp("serve-") as tmp:
        out = Path(tmp) / "out"
        if sqlite:
            result = await engine.restore_to(cluster, name, out, timestamp=timestamp, txid=txid)
            headers = {TXID_HEADER: txid_hex(result.txid), "Content-Type": "application/vnd.sqlite3",
                       "Content-Disposition": attachment(name)}
        else:
            header, _ = await engine.snapshot_file(cluster, name, out, timestamp=timestamp, txid=txid)
            headers = {TXID_HEADER: txid_hex(header.max_txid), "Content-Type": "application/octet-stream"}
        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_length = out.stat().st_size
        await resp.prepare(request)
        with open(out, "rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                await send(request, resp, chunk, within)
        await resp.write_eof()
        return resp


__all__ = ["MAX_SNAPSHOTS", "LiteFSAPI", "send_snapshot"]
