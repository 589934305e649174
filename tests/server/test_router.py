"""Requests forwarded to the process that writes their cluster (sidecar/server/router.py).

Two server processes over one store, as in test_handoff.py. A connection whose first request is not a cluster's
(here /healthz) is never handed over, so its later requests for another process's cluster are forwarded.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import time
from pathlib import Path

import pytest
from aiohttp import web

from sidecar.engine import Engine, Levels
from sidecar.engine.lease import LeaseDoc, Leases
from sidecar.ltx import Pos
from sidecar.server import ServerConfig, router, serve
from sidecar.server.handoff import head_of
from sidecar.server.metrics import Metrics
from sidecar.storage import open_storage
from tests.engine.history import History
from tests.s3server import free_port
from tests.server.procs import RED, TOKENS, Conn, Proc, start


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


async def test_a_writer_that_stops_mid_answer_cuts_the_forwarded_answer(tmp_path: Path) -> None:
    """The writer's answer ends early (its process died): the client's connection is closed after the bytes that
    came, so it sees a truncated answer, never one completed or followed by an error message."""
    async def writer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await writer.drain()
        writer.close()

    upstream = await asyncio.start_server(writer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    await Leases(open_storage(f"file://{tmp_path / 'store'}"), "elsewhere", f"http://127.0.0.1:{port}").acquire("red")
    b = await start(tmp_path / "store", tmp_path / "state-b", "bbbbbbbbbbbbbbbb")
    conn = await forwarding(b)
    try:
        conn.writer.write(f"GET /pos HTTP/1.1\r\nHost: x\r\nAuthorization: FlyV1 {RED}\r\n\r\n".encode())
        got = await asyncio.wait_for(conn.reader.read(), 10)  # to the end: the connection is closed
        head, _, body = got.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 1000" in head.lower()
        assert body == b"x" * len(body) and len(body) <= 100  # what came of it, if anything, and nothing else
    finally:
        conn.close()
        b.stop.set()
        await b.task
        upstream.close()
        await upstream.wait_closed()


async def test_a_forward_to_a_writer_that_stopped_answering_ends_in_503(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's process is stopped (SIGSTOP, a hung host): its kernel still takes connections, but nothing
    answers. The forwarding process probes it, and once it does not answer, tells the client to retry."""
    monkeypatch.setattr(router, "PROBE_EVERY", 0.2)
    monkeypatch.setattr(router, "PROBE_WITHIN", 0.5)
    stopped: list[asyncio.StreamWriter] = []

    async def writer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stopped.append(writer)  # read nothing, answer nothing, close nothing

    upstream = await asyncio.start_server(writer, "127.0.0.1", 0)
    port = upstream.sockets[0].getsockname()[1]
    await Leases(open_storage(f"file://{tmp_path / 'store'}"), "elsewhere", f"http://127.0.0.1:{port}").acquire("red")
    b = await start(tmp_path / "store", tmp_path / "state-b", "bbbbbbbbbbbbbbbb")
    conn = await forwarding(b)
    try:
        status, headers, body = await ask(conn, "GET", "/pos", {"Authorization": f"FlyV1 {RED}"})
        assert status == 503 and headers["retry-after"] == "1", body
        assert b"ENOTOWNER" in body and f"127.0.0.1:{port}".encode() in body
    finally:
        conn.close()
        b.stop.set()
        await b.task
        for w in stopped:
            w.close()
        upstream.close()
        await upstream.wait_closed()


ADMIN = "admin-0123456789abcdef0123456789"


async def test_listing_every_cluster_survives_a_writer_that_does_not_answer(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin's list of every cluster asks each cluster's writer for its view; one writer that is gone (refused
    connection) or stopped (no answer) leaves its cluster as this process sees it, and the list is answered."""
    monkeypatch.setattr(router, "PROBE_EVERY", 0.2)
    monkeypatch.setattr(router, "PROBE_WITHIN", 0.5)
    stopped: list[asyncio.StreamWriter] = []

    async def hung(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stopped.append(writer)

    upstream = await asyncio.start_server(hung, "127.0.0.1", 0)
    storage = open_storage(f"file://{tmp_path / 'store'}")
    await Leases(storage, "gone", f"http://127.0.0.1:{free_port()}").acquire("red")
    await Leases(storage, "stopped", f"http://127.0.0.1:{upstream.sockets[0].getsockname()[1]}").acquire("blue")
    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state-b", Levels())
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, ServerConfig(tokens=TOKENS, admin_token=ADMIN), "127.0.0.1", 0,
                                     stop=stop, grace=5, started=started.set_result, metrics=Metrics()))
    url = await asyncio.wait_for(started, 10)
    conn = Conn(*await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        status, _, body = await ask(conn, "GET", "/api/databases", {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200, body
        assert sorted(c["name"] for c in json.loads(body)["clusters"]) == ["blue", "red"]
    finally:
        conn.close()
        stop.set()
        await task
        for w in stopped:
            w.close()
        upstream.close()
        await upstream.wait_closed()


async def test_an_unreadable_lease_object_is_named_and_stops_only_its_cluster(tmp_path: Path) -> None:
    """A cluster whose lease object is not a lease: its own requests are refused naming the object, and the admin's
    list of every cluster is still answered."""
    storage = open_storage(f"file://{tmp_path / 'store'}")
    await Leases(storage, "elsewhere", "").acquire("blue")
    await storage.put_bytes(".litefs-sidecar/leases/red", b"not a lease")
    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state-b", Levels())
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, ServerConfig(tokens=TOKENS, admin_token=ADMIN), "127.0.0.1", 0,
                                     stop=stop, grace=5, started=started.set_result, metrics=Metrics()))
    url = await asyncio.wait_for(started, 10)
    conn = Conn(*await asyncio.open_connection("127.0.0.1", int(url.rsplit(":", 1)[1])))
    try:
        status, _, body = await ask(conn, "GET", "/pos", {"Authorization": f"FlyV1 {RED}"})
        assert status == 500 and b"lease object .litefs-sidecar/leases/red" in body, body
        status, _, body = await ask(conn, "GET", "/api/databases", {"Authorization": f"Bearer {ADMIN}"})
        assert status == 200, body
        assert sorted(c["name"] for c in json.loads(body)["clusters"]) == ["blue", "red"]
    finally:
        conn.close()
        stop.set()
        await task


async def test_a_live_writer_is_not_taken_for_stopped_while_forwards_fill_the_pool(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The health check has connections of its own: with every forwarding connection busy on long requests, a
    writer that answers its /healthz is still seen alive."""
    monkeypatch.setattr(router, "PROBE_EVERY", 0.1)
    monkeypatch.setattr(router, "PROBE_WITHIN", 0.5)
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    async def healthz(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/slow", slow)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state", Levels())
    r = router.Router(engine, "x" * 16)
    busy = [asyncio.create_task(r.session().get(f"http://127.0.0.1:{port}/slow")) for _ in range(100)]
    try:
        holder = LeaseDoc("elsewhere", f"http://127.0.0.1:{port}", 0, 1)
        with pytest.raises(TimeoutError):  # it keeps probing: the writer answers
            await asyncio.wait_for(r._stopped(holder), 3)
    finally:
        release.set()
        for resp in await asyncio.gather(*busy):
            resp.release()
        await r.close()
        await engine.close()
        await runner.cleanup()
