"""Connections handed to the process that writes their cluster, instead of forwarding each request.

Several server processes on one machine (`serve --workers N`, or several `serve` behind a proxy) each accept any
connection. A request for a cluster another process writes is forwarded over HTTP (router.py), which costs both
processes a request's work. But a LiteFS node holds one keep-alive connection, and every request on it is for its
cluster: so the first request decides the connection. Once its headers are in, the accepting process asks who
writes that cluster; if it is a sibling on this machine, the socket itself goes to that sibling (SCM_RIGHTS over a
Unix socket) with the bytes read so far, and the sibling serves the connection as if it had accepted it. A later
request on it for another cluster is forwarded as before.

    client ──TCP──▶ any process ──(first request's cluster is a sibling's)──▶ socket + bytes read ──▶ sibling

Each process listens on the abstract Unix socket named after its advertised address (`\\0litefs-sidecar:<URL>`),
so a lease's `addr` names its holder's socket: a holder on another machine has none here, and its requests are
forwarded over HTTP. Only processes of the same user can hand over (SO_PEERCRED). A connection is handed at most
once; a receiver never hands it on. Abstract Unix sockets are Linux's: elsewhere the Inbox does not start (logged
once) and every request for another process's cluster is forwarded. (Python's sockets are close-on-exec already.)
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("sidecar.server")

MAX_HANDED = 64 * 1024  # bytes read before the hand-over that travel with the socket; more: served here
_MISSING_FOR = 5.0  # seconds a sibling that could not be reached is not tried again
SEND_WITHIN = 1.0  # seconds a hand-over may wait for room in the sibling's queue
_BURST = 64  # hand-overs taken per wake-up of the receiving loop
_CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid


def socket_name(advertise: str) -> bytes:
    """The abstract Unix socket of the process that advertises `advertise`."""
    return b"\0litefs-sidecar:" + advertise.rstrip("/").encode()


def head_of(data: bytes) -> tuple[str, dict[str, str]] | None:
    """The request target and headers (lower-case names) of the first request in `data`; None if incomplete."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = data[:end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        return None
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return parts[1], headers


class Inbox:
    """Takes connections handed over by siblings and gives each to `adopt(sock, bytes already read)`."""

    def __init__(self, advertise: str, adopt: Callable[[socket.socket, bytes], None]) -> None:
        self.name = socket_name(advertise)
        self.adopt = adopt
        self._sock: socket.socket | None = None
        self._peers: set[socket.socket] = set()

    def start(self) -> bool:
        """Listen; False (logged) if the name is taken, which only a second process with the same address does."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except (OSError, AttributeError) as err:  # no Unix sequenced-packet sockets on this platform
            log.warning("connections cannot be handed to this process", error=str(err))
            return False
        try:
            sock.bind(self.name)
        except OSError as err:
            sock.close()
            log.warning("connections cannot be handed to this process", socket=self.name[1:].decode(),
                        error=err.strerror or str(err))
            return False
        sock.listen(64)
        sock.setblocking(False)
        self._sock = sock
        asyncio.get_running_loop().add_reader(sock, self._accept)
        return True

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in [*self._peers, *([self._sock] if self._sock else [])]:
            loop.remove_reader(s)
            s.close()
        self._peers.clear()
        self._sock = None

    def _accept(self) -> None:
        assert self._sock is not None
        try:
            peer, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        _, uid, _ = _CREDS.unpack(peer.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _CREDS.size))
        if uid != os.getuid():
            log.warning("refused a hand-over from another user", uid=uid)
            peer.close()
            return
        peer.setblocking(False)
        self._peers.add(peer)
        asyncio.get_running_loop().add_reader(peer, self._receive, peer)

    def _receive(self, peer: socket.socket) -> None:
        for _ in range(_BURST):
            try:
                data, fds, flags, _ = socket.recv_fds(peer, MAX_HANDED, 1)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data, fds, flags = b"", [], 0
            if not data and not fds:  # the sibling went away
                asyncio.get_running_loop().remove_reader(peer)
                self._peers.discard(peer)
                peer.close()
                return
            if len(fds) != 1 or flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
                for fd in fds:
                    os.close(fd)
                continue
            self.adopt(socket.socket(fileno=fds[0]), data)


class Siblings:
    """Hands connections to the processes on this machine that advertise an address, over one socket each."""

    def __init__(self, own: str, *, send_within: float = SEND_WITHIN) -> None:
        self.own = socket_name(own) if own else b""
        self.send_within = send_within
        self._conns: dict[bytes, socket.socket] = {}
        self._locks: dict[bytes, asyncio.Lock] = {}
        self._missing: dict[bytes, float] = {}  # name -> monotonic time until which it is not tried

    def close(self) -> None:
        for s in self._conns.values():
            s.close()
        self._conns.clear()

    async def hand(self, addr: str, sock: Any, data: bytes) -> bool:
        """Send the connection `sock` (with the bytes read from it) to the process advertising `addr`; False if
        there is none on this machine or it cannot take it within a second (the caller then serves it).

        The kernel queues only a few messages per Unix socket (`net.unix.max_dgram_qlen`): when many connections
        arrive at once, a send waits for room rather than giving up and leaving the connection forwarded for its
        whole life."""
        name = socket_name(addr)
        if name == self.own or len(data) > MAX_HANDED or time.monotonic() < self._missing.get(name, 0.0):
            return False
        conn = self._conns.get(name)
        if conn is None:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            conn.setblocking(False)
            try:
                conn.connect(name)
            except OSError:  # no such process here, or its backlog is full
                conn.close()
                self._missing[name] = time.monotonic() + _MISSING_FOR
                return False
            self._conns[name] = conn
            self._locks[name] = asyncio.Lock()
        try:
            async with asyncio.timeout(self.send_within), self._locks[name]:  # one waits for room at a time: add_writer
                while True:                                                # has one callback per descriptor
                    try:
                        socket.send_fds(conn, [data], [sock.fileno()])
                        break
                    except (BlockingIOError, InterruptedError):
                        await _writable(conn)
        except TimeoutError:  # the sibling is not reading (stopped, or hung): stop trying it for a while
            self._missing[name] = time.monotonic() + _MISSING_FOR
            return False
        except OSError:
            conn.close()
            self._conns.pop(name, None)
            return False
        return True


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock, ready.set_result, None)
    try:
        await ready
    finally:
        loop.remove_writer(sock)


class Peers:
    """The workers of one `serve --workers N`, seen through one small file each in their shared state directory.

    Each process writes `<state_dir>/worker-<n>/peer.json` ({"advertise", "leases", "pid"}) whenever the number of
    leases it holds changes. A cluster's lease goes to whichever process sees its first request, so without this
    the clusters split at random: with 8 clusters and two workers, 5:3 or 6:2, and the busier process sets the
    latency. With it, a process about to take a free lease hands the connection instead to the sibling holding the
    fewest leases, if that is fewer than its own; the sibling then takes the lease. Counts a moment stale only
    make a hand-over more or less likely: the lease itself is always decided by the store.
    """

    FILE = "peer.json"

    def __init__(self, root: Path, own_dir: Path, advertise: str) -> None:
        self.root = root
        self.own = own_dir / self.FILE
        self.advertise = advertise

    def publish(self, leases: int) -> None:
        """Write this process's count (atomically: a reader sees the old file or the new, never half)."""
        tmp = self.own.with_name(self.FILE + ".tmp")
        tmp.write_text(json.dumps({"advertise": self.advertise, "leases": leases, "pid": os.getpid()}))
        os.replace(tmp, self.own)

    def lightest(self, mine: int, extra: Mapping[str, int] | None = None) -> str | None:
        """The address of the sibling holding the fewest leases (its file's count plus `extra[address]`), if fewer
        than `mine`; None otherwise."""
        best: tuple[int, str] | None = None
        for path in sorted(self.root.glob(f"worker-*/{self.FILE}")):
            if path == self.own:
                continue
            try:
                doc = json.loads(path.read_text())
                addr = str(doc["advertise"])
                count = int(doc["leases"]) + (extra or {}).get(addr, 0)
            except (OSError, ValueError, KeyError, TypeError):
                continue  # being replaced, or left by an older version: skip it
            if count < mine and (best is None or count < best[0]):
                best = (count, addr)
        return best[1] if best else None


__all__ = ["MAX_HANDED", "SEND_WITHIN", "Inbox", "Peers", "Siblings", "head_of", "socket_name"]
