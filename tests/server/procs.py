"""Server "processes" inside the test's process: an engine and an aiohttp server each, on their own ports over one
store, and a raw keep-alive HTTP/1.1 connection to one (shared by test_handoff.py and test_router.py; the `pair`
fixture is in conftest.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from sidecar.engine import Engine, Levels
from sidecar.server import Scope, ServerConfig, serve
from sidecar.server.handoff import head_of
from sidecar.server.metrics import Metrics
from sidecar.storage import open_storage

RED, BLUE, GREEN = "tok-red-0123456789abcdef0", "tok-blue-0123456789abcdef", "tok-green-0123456789abcde"
TOKENS = {RED: Scope("red"), BLUE: Scope("blue"), GREEN: Scope("green")}


@dataclass
class Proc:
    url: str
    port: int
    engine: Engine
    metrics: Metrics
    instance: str
    stop: asyncio.Event
    task: asyncio.Task[None]


async def start(store: Path, state: Path, instance: str, peers: Path | None = None) -> Proc:
    engine = await Engine.open(open_storage(f"file://{store}"), state, Levels(l0_interval=0.0))
    metrics = Metrics()
    stop = asyncio.Event()
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(engine, ServerConfig(tokens=TOKENS, instance_id=instance), "127.0.0.1", 0,
                                     stop=stop, grace=5, started=started.set_result, metrics=metrics,
                                     peers=peers))
    url = await asyncio.wait_for(started, 10)
    return Proc(url, int(url.rsplit(":", 1)[1]), engine, metrics, instance, stop, task)


class Conn:
    """One keep-alive HTTP/1.1 connection; `ask` sends a request and reads its whole answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def to(cls, p: Proc) -> Conn:
        return cls(*await asyncio.open_connection("127.0.0.1", p.port))

    async def ask(self, method: str, target: str, token: str, body: bytes | None = None) -> tuple[int, dict[str, str],
                                                                                                    bytes]:
        head = f"{method} {target} HTTP/1.1\r\nHost: x\r\nAuthorization: FlyV1 {token}\r\n"
        if body is not None:  # chunked, as LiteFS sends an upload
            head += "Transfer-Encoding: chunked\r\n"
            data = head.encode() + b"\r\n" + f"{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n"
        else:
            data = head.encode() + b"\r\n"
        self.writer.write(data)
        raw = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        got = head_of(b"GET / HTTP/1.1\r\n" + raw.split(b"\r\n", 1)[1])
        assert got is not None
        status = int(raw.split(b" ", 2)[1])
        headers = got[1]
        payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, payload

    def close(self) -> None:
        self.writer.close()
