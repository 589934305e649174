"""Fuzzing every route over real HTTP: mutated real uploads, random headers, parameters, bodies and encodings, with
and without each kind of token. Never a 5xx, never a traceback in the log; afterwards every stored backup still
verifies and restores."""

from __future__ import annotations

import asyncio
import gzip
import http.client
import json
import logging
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.cli import main
from tests.engine.history import History
from tests.server.conftest import ADMIN, OTHER, READER, TOKEN, Running, start_server

ROUTES = [("GET", "/pos"), ("POST", "/db/tx"), ("GET", "/db/snapshot"), ("GET", "/db/hwm"), ("GET", "/api/databases"),
          ("GET", "/api/db"), ("DELETE", "/api/db"), ("POST", "/api/restore"), ("GET", "/api/download"),
          ("GET", "/api/preview"), ("POST", "/api/upload"), ("POST", "/api/clone"), ("GET", "/metrics"),
          ("GET", "/healthz"), ("GET", "/readyz"), ("POST", "/ui/login"), ("GET", "/ui/session"),
          ("POST", "/ui/logout"), ("PUT", "/db/tx"), ("GET", "/nowhere")]
AUTH = [None, "", "garbage", TOKEN, f"FlyV1 {TOKEN}", f"Bearer {OTHER}", READER, ADMIN, f"Bearer {ADMIN}x",
        "cluster default", "x" * 9000]


class ServerThread:
    """A real server on 127.0.0.1 in a thread of its own, for a synchronous (Hypothesis) test to hit."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: Running = asyncio.run_coroutine_threadsafe(start_server(root), self.loop).result(30)
        self.port = int(self.server.url.rsplit(":", 1)[1])

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        # Generous: what is asserted is the status, and a full run in two processes once saw a request wait
        # 30 s for its answer on this 2-core VM (not seen again; cause not found, see the closing note).
        con = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        try:
            con.request(method, path, body=body, headers=headers)
            resp = con.getresponse()
            return resp.status, resp.read()
        finally:
            con.close()


class Crashes(logging.Handler):
    """Every log record carrying a traceback, or at error level from aiohttp (its "Error handling request")."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info or (record.name.startswith("aiohttp") and record.levelno >= logging.ERROR):
            self.records.append(record)


CRASHES = Crashes()


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, list[bytes]]]:
    """The server, with real uploads of two databases stored, and the uploads (to mutate)."""
    root = tmp_path_factory.mktemp("fuzz")
    logging.getLogger().addHandler(CRASHES)
    srv = ServerThread(root)
    uploads = []
    for name in ("app.db", "other.db"):
        h = History(root / name)
        for i in range(4):
            h.write()
            data = h.commit(1_790_000_000_000 + i)
            uploads.append(data)
            status, body = srv.request("POST", f"/db/tx?db={name}", data, {"Authorization": TOKEN})
            assert status == 200, body
        h.close()
    yield srv, uploads
    srv.stop()
    logging.getLogger().removeHandler(CRASHES)


def mutate(data: bytes, how: int, at: int, value: int) -> bytes:
    """One of a few ways to damage a real upload."""
    at %= max(1, len(data))
    if how == 0:
        return data[:at] + bytes([data[at] ^ (value or 1)]) + data[at + 1:]  # a flipped byte
    if how == 1:
        return data[:at]  # cut short
    if how == 2:
        return data + bytes([value]) * (at % 300)  # trailing bytes
    if how == 3:
        return data[:at] + data[at + 1:]  # a byte gone
    return data  # as is (a replay, or in the wrong place)


names = st.one_of(st.sampled_from(["app.db", "other.db", "new.db", "", "..", "a/b", " x", "é.db", "x" * 300]),
                  st.text(max_size=20))
bodies = st.one_of(st.just(b""), st.binary(max_size=2000), st.integers(0, 7).flatmap(
    lambda i: st.tuples(st.just(i), st.integers(0, 4), st.integers(0, 10_000), st.integers(0, 255))),
    st.dictionaries(st.sampled_from(["txid", "timestamp", "token", "x"]),
                    st.one_of(st.text(max_size=30), st.integers(), st.none(), st.booleans()), max_size=3))
encodings = st.sampled_from([None, "gzip", "deflate", "br", "identity", "gzip, gzip", "x-nope"])


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(route=st.sampled_from(ROUTES), auth=st.sampled_from(AUTH), db=names,
       params=st.dictionaries(st.sampled_from(["cluster", "txid", "timestamp", "format", "to_cluster", "to_db", "x"]),
                              st.text(max_size=24), max_size=3),
       body=bodies, encoding=encodings, really_encode=st.booleans(),
       extra=st.dictionaries(st.sampled_from(["Content-Type", "X-CSRF-Token", "Cookie", "Litefs-Cluster-Id",
                                              "Lfsc-Forwarded-By", "Transfer-Encoding-Hint"]),
                             st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40),
                             max_size=2))
def test_no_request_gets_a_5xx(live: tuple[ServerThread, list[bytes]], route: tuple[str, str], auth: str | None,
                               db: str, params: dict[str, str], body: object, encoding: str | None,
                               really_encode: bool, extra: dict[str, str]) -> None:
    srv, uploads = live
    method, path = route
    if isinstance(body, tuple):
        i, how, at, value = body
        data = mutate(uploads[i], how, at, value)
    elif isinstance(body, dict):
        data = json.dumps(body).encode()
    else:
        assert isinstance(body, bytes)
        data = body
    headers = dict(extra)
    if auth is not None:
        headers["Authorization"] = auth
    if encoding:
        headers["Content-Encoding"] = encoding
        if really_encode and encoding == "gzip":
            data = gzip.compress(data)
        elif really_encode and encoding == "deflate":
            data = zlib.compress(data)
    query = urlencode({"db": db, **params})
    status, answer = srv.request(method, f"{path}?{query}", data, headers)
    assert status < 500, (method, path, query, status, answer[:300])
    if status >= 400 and path not in ("/nowhere",) and answer[:1] == b"{":
        doc = json.loads(answer)
        assert doc["code"] and doc["error"], doc


def test_after_the_fuzz_every_backup_verifies_and_nothing_was_logged_as_a_crash(
        live: tuple[ServerThread, list[bytes]]) -> None:
    """Runs after the fuzz (same module): the stored backups are intact, and the server logged no traceback."""
    srv, _ = live
    status, _ = srv.request("GET", "/healthz", b"", {})
    assert status == 200
    store = srv.root / "store"
    for cluster_dir in sorted(p for p in store.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for db_dir in sorted(p for p in cluster_dir.iterdir() if p.is_dir()):
            assert main(["verify", str(db_dir)]) == 0, db_dir
    assert not CRASHES.records, [(r.name, r.getMessage()) for r in CRASHES.records]
