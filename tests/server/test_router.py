"""Requests forwarded to the process that writes their cluster (sidecar/server/router.py).

Two server processes over one store, as in test_handoff.py. A connection whose first request is not a cluster's
(here /healthz) is never handed over, so its later requests for another process's cluster are forwarded.
"""

from __future__ import annotations

import asyncio
import gzip
import time
from pathlib import Path

from sidecar.ltx import Pos
from tests.engine.history import History
from tests.server.test_handoff import RED, Conn, Proc, head_of, pair

__all__ = ["pair"]


async def ask(conn: Conn, method: str, target: str, headers: dict[str, str], body: bytes | None = None
              ) -> tuple[int, dict[str, str], bytes]:
    """One request with its own headers (the body sent with a Content-Length); its status, headers and body."""
    head = f"{method} {target} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    if body is not None:
        head += f"Content-Length: {len(body)}\r\n"
    conn.writer.write(head.encode() + b"\r\n" + (body or b""))
    raw = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
    got = head_of(b"GET / HTTP/1.1\r\n" + raw.split(b"\r\n", 1)[1])
    assert got is not None
    payload = await asyncio.wait_for(conn.reader.readexactly(int(got[1].get("content-length", "0"))), 10)
    return int(raw.split(b" ", 2)[1]), got[1], payload


async def forwarding(b: Proc) -> Conn:
    """A connection to `b` that stays with `b` (its first request names no cluster)."""
    conn = await Conn.to(b)
    status, _, _ = await ask(conn, "GET", "/healthz", {})
    assert status == 200
    return conn


async def test_a_compressed_upload_is_forwarded_as_sent(pair: tuple[Proc, Proc], tmp_path: Path) -> None:
    """An upload with `Content-Encoding: gzip` reaches the writer through another process and is stored."""
    a, b = pair
    first = await Conn.to(a)
    conn = await forwarding(b)
    try:
        status, headers, _ = await ask(first, "GET", "/pos", {"Authorization": f"FlyV1 {RED}"})
        assert status == 200 and a.engine.owns("red")
        history = History(tmp_path / "red.db")
        history.write()
        upload = gzip.compress(history.commit(int(time.time() * 1000)))
        status, headers, body = await ask(conn, "POST", "/db/tx?db=app.db",
                                          {"Authorization": f"FlyV1 {RED}", "content-encoding": "GZIP"}, upload)
        assert status == 200, body
        assert headers["lfsc-instance-id"] == a.instance
        assert b.metrics.forwarded._value.get() == 1
        got = await a.engine.restore_to("red", "app.db", tmp_path / "out.db")
        assert Pos(got.txid, got.checksum) == history.pos
    finally:
        conn.close()
        first.close()
