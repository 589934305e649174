"""Connections handed whole to the process that writes their cluster (sidecar/server/handoff.py).

Two server processes (two engines and two aiohttp servers in this test's process: the hand-over is between
sockets, so it is the same) over one store, each on its own port on 127.0.0.1. Requests are raw HTTP/1.1 on
keep-alive connections, as LiteFS's backup client holds one.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path

from sidecar.ltx import Pos
from sidecar.server.handoff import SEND_WITHIN, Siblings, head_of, socket_name
from tests.engine.history import History
from tests.server.procs import BLUE, GREEN, RED, Conn, Proc, start


async def test_a_connection_reaches_the_writer_of_its_cluster_whole(pair: tuple[Proc, Proc], tmp_path: Path) -> None:
    a, b = pair
    first = await Conn.to(a)
    status, headers, _ = await first.ask("GET", "/pos", RED)  # a takes red's lease
    assert status == 200 and headers["lfsc-instance-id"] == a.instance
    assert a.engine.owns("red")

    history = History(tmp_path / "red.db")
    history.write()
    upload = history.commit(int(time.time() * 1000))
    conn = await Conn.to(b)  # a connection to the other process, as a load balancer may send it
    try:
        status, headers, body = await conn.ask("POST", "/db/tx?db=app.db", RED, upload)
        assert status == 200, body
        assert headers["lfsc-instance-id"] == a.instance  # answered by the writer itself, not through b
        for _ in range(3):  # the connection stays with a: every later request on it too
            history.write()
            status, headers, body = await conn.ask("POST", "/db/tx?db=app.db", RED,
                                                   history.commit(int(time.time() * 1000)))
            assert (status, headers["lfsc-instance-id"]) == (200, a.instance), body
        assert b.metrics.handed._value.get() == 1
        assert b.metrics.forwarded._value.get() == a.metrics.forwarded._value.get() == 0
        assert not b.engine.owns("red")
        got = await a.engine.restore_to("red", "app.db", tmp_path / "out.db")
        assert Pos(got.txid, got.checksum) == history.pos
    finally:
        conn.close()
        first.close()


async def assert_taken_here(p: Proc, cluster: str, token: str) -> None:
    """A new connection to `p` for `cluster`: `p` answers it, holds the cluster's lease, and hands nothing over."""
    conn = await Conn.to(p)
    try:
        status, headers, _ = await conn.ask("GET", "/pos", token)
        assert (status, headers["lfsc-instance-id"]) == (200, p.instance)
        assert p.engine.owns(cluster) and p.metrics.handed._value.get() == 0
    finally:
        conn.close()


async def test_a_free_cluster_is_taken_where_its_connection_arrives(pair: tuple[Proc, Proc]) -> None:
    _, b = pair
    await assert_taken_here(b, "blue", BLUE)


async def test_a_hand_over_waits_for_room_in_the_siblings_queue() -> None:
    """The kernel queues a bounded number of bytes on a Unix socket: when many connections arrive at once (a fleet
    reconnecting after a restart), a hand-over waits for room, up to SEND_WITHIN, rather than leaving its connection
    forwarded for its whole life."""
    addr = f"http://127.0.0.1:1/test-{os.getpid()}-{time.monotonic_ns()}"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(socket_name(addr))
    listener.listen(4)
    siblings = Siblings("", send_within=60.0)  # long enough for any machine: the drain below must win
    patient = siblings
    left, right = socket.socketpair()  # the connection handed over (the same one each time will do)
    n, head = 400, b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 4000 + b"\r\n\r\n"
    try:
        sends = [asyncio.create_task(siblings.hand(addr, left, head)) for _ in range(n)]
        await asyncio.sleep(0.2)
        queued = sum(t.done() for t in sends)
        assert 0 < queued < n  # the queue is full: the rest wait
        peer, _ = listener.accept()
        peer.setblocking(False)
        got = 0
        while got < n:  # drain as the sibling's loop would
            try:
                data, fds, _, _ = socket.recv_fds(peer, 8192, 1)
            except BlockingIOError:
                await asyncio.sleep(0.01)
                continue
            assert data == head and len(fds) == 1
            os.close(fds[0])
            got += 1
        assert all(await asyncio.gather(*sends))
        # Nobody reading: after a second's wait the hand-overs give up (all within about a second), the callers
        # serve their connections, and the sibling is not tried again for a while.
        siblings = Siblings("")  # the default wait: SEND_WITHIN
        t0 = time.monotonic()
        results = await asyncio.gather(*(siblings.hand(addr, left, head) for _ in range(n)))
        assert 0 < results.count(False) < n and time.monotonic() - t0 < 5 * SEND_WITHIN
        assert not await siblings.hand(addr, left, head)
        peer.close()
    finally:
        patient.close()
        siblings.close()
        listener.close()
        left.close()
        right.close()


async def test_refusals_are_answered_where_they_arrive(pair: tuple[Proc, Proc]) -> None:
    """A wrong token, a token for another cluster's `?cluster=`, and no token: nothing to route; the process
    that accepted the connection answers, and the connection is not handed."""
    a, b = pair
    held = await Conn.to(a)
    await held.ask("GET", "/pos", RED)
    try:
        for target, token in [("/pos", "not-a-token"), ("/pos?cluster=blue", RED)]:
            conn = await Conn.to(b)
            status, headers, _ = await conn.ask("GET", target, token)
            conn.close()
            assert (status, headers["lfsc-instance-id"]) == (401, b.instance), target
        conn = await Conn.to(b)
        conn.writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(conn.reader.readuntil(b"\r\n\r\n"), 10)
        conn.close()
        assert raw.startswith(b"HTTP/1.1 200") and b"bbbbbbbbbbbbbbbb" in raw
        assert b.metrics.handed._value.get() == 0
    finally:
        held.close()


async def test_after_the_writer_stops_its_clusters_connections_are_served_where_they_arrive(
        pair: tuple[Proc, Proc]) -> None:
    """The writer let its lease go at a clean stop (its socket is gone too): the next connection's process takes
    the lease and answers; nothing is handed to a process that is not there. (A killed writer, whose lease
    outlives it, is in test_scaleout.py: there the request is answered 503 until the lease expires.)"""
    a, b = pair
    conn = await Conn.to(a)
    await conn.ask("GET", "/pos", RED)
    conn.close()
    a.stop.set()
    await a.task
    await assert_taken_here(b, "red", RED)


async def test_workers_share_the_free_clusters_evenly(tmp_path: Path) -> None:
    """Workers of one `serve --workers` (one state directory, a `worker-<n>` each): a free cluster whose first
    connection reaches the process holding more leases goes to the one holding fewer, which takes it."""
    state = tmp_path / "state"
    a = await start(tmp_path / "store", state / "worker-1", "aaaaaaaaaaaaaaaa", peers=state)
    b = await start(tmp_path / "store", state / "worker-2", "bbbbbbbbbbbbbbbb", peers=state)
    conns = []
    try:
        answered = []
        for token in (RED, BLUE, GREEN):  # every first connection reaches a, as a load balancer may send them
            conns.append(conn := await Conn.to(a))
            status, headers, _ = await conn.ask("GET", "/pos", token)
            answered.append((status, headers["lfsc-instance-id"]))
        # red: a holds nothing yet and takes it; blue: b holds fewer (0 < 1) and gets the connection; green:
        # both hold one, so a keeps it.
        assert answered == [(200, a.instance), (200, b.instance), (200, a.instance)]
        assert (a.engine.owns("red"), b.engine.owns("blue"), a.engine.owns("green")) == (True, True, True)
        assert a.metrics.handed._value.get() == 1
        status, headers, _ = await conns[1].ask("GET", "/pos", BLUE)  # the handed connection stays with b
        assert (status, headers["lfsc-instance-id"]) == (200, b.instance)
        assert json.loads((state / "worker-1" / "peer.json").read_text())["leases"] == 2
        assert json.loads((state / "worker-2" / "peer.json").read_text())["leases"] == 1
    finally:
        for c in conns:
            c.close()
        for p in (a, b):
            p.stop.set()
            await p.task


def test_head_of_reads_the_first_request_only_once_its_headers_are_in() -> None:
    assert head_of(b"POST /db/tx?db=a HTTP/1.1\r\nAuthorization: FlyV1 x\r\nHost:") is None
    assert head_of(b"POST /db/tx?db=a HTTP/1.1\r\nAuthorization:  FlyV1 x \r\nX-A: 1:2\r\n\r\nbody") == (
        "/db/tx?db=a", {"authorization": "FlyV1 x", "x-a": "1:2"})
    assert head_of(b"NONSENSE\r\n\r\n") is None
