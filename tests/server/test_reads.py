"""Reading backups through the server: plans, files by range, long-polls, and read-only tokens."""

from __future__ import annotations

import asyncio
import json
import struct
import tracemalloc
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import lz4.block
import pytest

from sidecar.engine import head as heads
from sidecar.errors import SidecarError
from sidecar.ltx.pageindex import decode as decode_index
from sidecar.server import Scope, parse_tokens
from sidecar.server.reads import Reads
from tests.engine.history import History
from tests.server.conftest import ADMIN, OTHER, READER, SNAPSHOT, TOKEN, Running, post, wait_until

AUTH = {"Authorization": f"Bearer {READER}"}


def async_(cond: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """`cond` as wait_until takes it."""
    async def check() -> bool:
        return cond()
    return check


async def upload(server: Running, history: History, n: int) -> None:
    for _ in range(n):
        history.write(n=20)
        await server.engine.write_tx("default", "app.db", history.commit(1_790_000_000_000))


@pytest.fixture
async def history(tmp_path: Path) -> History:  # type: ignore[misc]
    h = History(tmp_path / "live.db")
    yield h
    h.close()


class TestTokens:
    def test_third_column_makes_a_read_only_token(self) -> None:
        text = "default tok-rw-0123456789abcdef\ndefault tok-ro-0123456789abcdef read  # readers\n"
        assert parse_tokens(text, "tokens") == {"tok-rw-0123456789abcdef": Scope("default"),
                                                "tok-ro-0123456789abcdef": Scope("default", readonly=True)}
        with pytest.raises(SidecarError, match="line 1: want '<cluster> <token>' or '<cluster> <token> read'"):
            parse_tokens("default tok-ro-0123456789abcdef write", "tokens")

    async def test_a_read_token_can_never_write(self, server: Running, http: aiohttp.ClientSession,
                                                history: History) -> None:
        await upload(server, history, 2)
        before = server.engine.pos("default", "app.db")
        writes = [("POST", "/db/tx?db=app.db", history.commit(1)), ("POST", "/api/restore?db=app.db", b'{"txid": 1}'),
                  ("POST", "/api/upload?db=x.db", b"SQLite"), ("POST", "/api/clone?db=app.db&to_cluster=default&to=y",
                                                                b""), ("DELETE", "/api/db?db=app.db", b""),
                  ("PUT", "/db/ltx?db=app.db", b"")]
        for method, path, body in writes:
            async with http.request(method, server.url + path, data=body, headers=AUTH) as resp:
                assert resp.status == 403, (method, path)
                doc = await resp.json()
                assert doc["code"] == "EREADONLY" and method in doc["error"], doc
        async with http.post(server.url + "/ui/login", json={"token": READER}) as resp:
            assert resp.status == 401  # the dashboard acts: read-only tokens cannot sign in
        async with http.get(server.url + "/pos", headers=AUTH) as resp:
            assert resp.status == 200 and "app.db" in await resp.json()
        assert server.engine.pos("default", "app.db") == before  # nothing was written

    async def test_a_read_token_sees_only_its_cluster(self, server: Running, http: aiohttp.ClientSession,
                                                      history: History) -> None:
        await upload(server, history, 1)
        other = History(history.path.with_name("other.db"), seed=2)
        other.write()
        await server.engine.write_tx("other", "secret.db", other.commit(1))
        other.close()
        for path in ("/db/plan?db=secret.db", "/db/head?db=secret.db", "/db/ltx?db=secret.db&file=0/"
                     "0000000000000001-0000000000000001.ltx"):
            async with http.get(server.url + path, headers=AUTH) as resp:
                assert resp.status == 404 and (await resp.json())["code"] == "ENODB", path
        async with http.get(server.url + "/db/plan?db=secret.db&cluster=other", headers=AUTH) as resp:
            assert resp.status == 401
        async with http.get(server.url + "/db/plan?db=secret.db",
                            headers={"Authorization": f"Bearer {OTHER}"}) as resp:
            assert resp.status == 200  # the other cluster's own token does see it
        async with http.get(server.url + "/db/plan?db=secret.db&cluster=other",
                            headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
            assert resp.status == 200


class TestReadRoutes:
    async def test_plan_locates_page_indexes_and_files_serve_ranges(self, server: Running,
                                                                    http: aiohttp.ClientSession,
                                                                    history: History) -> None:
        await upload(server, history, 3)
        async with http.get(server.url + "/db/plan?db=app.db", headers=AUTH) as resp:
            assert resp.status == 200
            plan = heads.decode(await resp.read())
        assert plan.txid == history.pos.txid and plan.indexes is not None
        for entry, (start, length) in zip(plan.plan, plan.indexes, strict=True):
            name = f"{entry.level}/{entry.min_txid:016x}-{entry.max_txid:016x}.ltx"
            url = f"{server.url}/db/ltx?db=app.db&file={name}"
            async with http.get(url, headers=AUTH) as resp:
                assert resp.status == 200 and resp.headers["Cache-Control"] == "private, max-age=31536000, immutable"
                whole, etag = await resp.read(), resp.headers["ETag"]
            assert len(whole) == entry.size
            run = decode_index(whole[start:start + length], start, aligned_start=True, aligned_end=True)
            assert run is not None and run.pgnos  # the located bytes are the page index
            async with http.get(url, headers={**AUTH, "Range": f"bytes={start}-{start + length - 1}"}) as resp:
                assert resp.status == 206 and await resp.read() == whole[start:start + length]
                assert resp.headers["Content-Range"] == f"bytes {start}-{start + length - 1}/{entry.size}"
            async with http.get(url, headers={**AUTH, "Range": "bytes=-16"}) as resp:
                assert resp.status == 206 and await resp.read() == whole[-16:]
            async with http.get(url, headers={**AUTH, "If-None-Match": etag}) as resp:
                assert resp.status == 304
            async with http.get(url, headers={**AUTH, "Range": f"bytes={entry.size}-"}) as resp:
                assert resp.status == 416 and resp.headers["Content-Range"] == f"bytes */{entry.size}"
        async with http.get(server.url + "/db/ltx?db=app.db&file=0/0000000000000063-0000000000000063.ltx",
                            headers=AUTH) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == "ENOTFOUND"
        async with http.get(server.url + "/db/plan?db=app.db&txid=0000000000000063", headers=AUTH) as resp:
            assert resp.status == 404 and (await resp.json())["code"] == "ENOTXID"
        for bad in ("zz", "-1", "+1", "0x10", "1_0", " 10", "1" * 17):  # int(x, 16) takes all but the first
            async with http.get(server.url + "/db/plan", params={"db": "app.db", "txid": bad}, headers=AUTH) as resp:
                assert resp.status == 400 and "want a hex TXID" in (await resp.json())["error"], bad

    async def test_a_range_as_big_as_the_file_is_streamed(self, server: Running, http: aiohttp.ClientSession,
                                                          history: History) -> None:
        """`Range: bytes=0-` of a stored file costs the server what a whole download costs, not the file's size in
        memory (a multi-GB snapshot asked for so, a few times at once, would take the server down)."""
        history.con.execute("CREATE TABLE blobs (b BLOB)")
        history.con.execute("BEGIN")
        for _ in range(2000):
            history.con.execute("INSERT INTO blobs VALUES (randomblob(4000))")  # incompressible: ~8 MiB stored
        history.con.execute("COMMIT")
        await server.engine.write_tx("default", "app.db", history.commit(1_790_000_000_000))
        entry = server.engine.index("default", "app.db").level(0)[-1]
        assert entry.size > 8_000_000
        url = f"{server.url}/db/ltx?db=app.db&file=0/{entry.min_txid:016x}-{entry.max_txid:016x}.ltx"
        tracemalloc.start()
        try:
            async with http.get(url, headers={**AUTH, "Range": "bytes=0-"}) as resp:
                assert resp.status == 206 and resp.headers["Content-Range"] == f"bytes 0-{entry.size - 1}/{entry.size}"
                received = 0
                async for chunk in resp.content.iter_chunked(1 << 16):
                    received += len(chunk)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert received == entry.size
        assert peak < entry.size // 2, (peak, entry.size)

    async def test_digits_that_are_not_ascii_are_refused(self, server: Running, http: aiohttp.ClientSession,
                                                         history: History) -> None:
        """A file level or Range with a character Python calls a digit but int() refuses ('²') is the client's
        mistake (400, 416), not a crash (500)."""
        await upload(server, history, 1)
        name = f"{history.pos.txid:016x}-{history.pos.txid:016x}.ltx"
        async with http.get(f"{server.url}/db/ltx?db=app.db&file=²/{name}", headers=AUTH) as resp:
            assert resp.status == 400 and "want <level>/" in (await resp.json())["error"]
        for spec in ("bytes=²-", "bytes=-²", "bytes=0-²"):
            async with http.get(f"{server.url}/db/ltx?db=app.db&file=0/{name}",
                                headers={**AUTH, "Range": spec}) as resp:
                assert resp.status == 416 and (await resp.json())["code"] == "EBADRANGE", spec

    async def test_head_long_poll_answers_once_per_change(self, server: Running, http: aiohttp.ClientSession,
                                                          history: History) -> None:
        await upload(server, history, 1)
        async with http.get(server.url + "/db/head?db=app.db", headers=AUTH) as resp:
            first, tag = heads.decode(await resp.read()), resp.headers["ETag"]
        assert first.txid == history.pos.txid and tag.startswith('"')
        async with http.get(server.url + "/db/head?db=app.db&wait=0", headers={**AUTH, "If-None-Match": tag}) as resp:
            assert resp.status == 304
        held = asyncio.ensure_future(http.get(server.url + "/db/head?db=app.db&wait=60",
                                              headers={**AUTH, "If-None-Match": tag}))
        await asyncio.sleep(0.2)
        assert not held.done()  # nothing changed: held
        await upload(server, history, 1)  # l0_interval 0: stored at once
        resp = await asyncio.wait_for(held, 30)
        async with resp:
            assert resp.status == 200 and resp.headers["ETag"] != tag
            assert heads.decode(await resp.read()).txid == history.pos.txid

    async def test_shutdown_answers_held_long_polls(self, server: Running, http: aiohttp.ClientSession,
                                                    history: History) -> None:
        await upload(server, history, 1)
        async with http.get(server.url + "/db/head?db=app.db", headers=AUTH) as resp:
            tag = resp.headers["ETag"]
        held = asyncio.ensure_future(http.get(server.url + "/db/head?db=app.db&wait=60",
                                              headers={**AUTH, "If-None-Match": tag}))
        await asyncio.sleep(0.2)
        await asyncio.wait_for(server.shutdown(), 30)  # the server's grace is 5 s: the poll did not hold it
        resp = await asyncio.wait_for(held, 5)
        async with resp:
            assert resp.status == 304

    async def test_a_long_poll_ends_when_its_client_goes_away(self, server: Running, http: aiohttp.ClientSession,
                                                               history: History) -> None:
        """A client that opens long-polls and hangs up holds nothing: the polls the connection cap no longer counts
        would otherwise stay waiting (three tasks each) for up to a minute, as many as a client cares to churn."""
        await upload(server, history, 1)
        stored = server.engine.stored
        await wait_until(async_(lambda: bool(server.engine.index("default", "app.db").level(9))))  # head stable now
        async with http.get(server.url + "/db/head?db=app.db", headers=AUTH) as resp:
            tag = resp.headers["ETag"]
        canary = asyncio.ensure_future(http.get(server.url + "/db/head?db=app.db&wait=60",
                                                headers={**AUTH, "If-None-Match": tag}))
        host, port = server.url.removeprefix("http://").split(":")
        request = (f"GET /db/head?db=app.db&wait=60 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READER}\r\n"
                   f"If-None-Match: {tag}\r\n\r\n").encode()
        writers = []
        for _ in range(50):
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(request)
            writers.append(writer)
        await wait_until(async_(lambda: len(stored._waiters) == 51))  # type: ignore[attr-defined]
        for writer in writers:
            writer.close()
            await writer.wait_closed()
        await wait_until(async_(lambda: len(stored._waiters) == 1))  # type: ignore[attr-defined]
        assert not canary.done()  # the head did not change: the 50 ended because their clients left
        canary.cancel()

    async def test_deleted_databases_leave_nothing_in_the_head_caches(self, server: Running,
                                                                      http: aiohttp.ClientSession) -> None:
        """A token may create and delete its databases in a loop: the heads cached for them must go with them, or
        the server's memory grows with every database that ever was (each entry holding a whole index)."""
        reads = Reads(server.engine)
        for i in range(100):
            name = f"churn-{i}.db"
            assert (await post(http, server.url, name, SNAPSHOT))[0] == 200
            reads._latest("default", name, server.engine.index("default", name))
            async with http.delete(f"{server.url}/api/db", params={"db": name},
                                   headers={"Authorization": TOKEN}) as resp:
                assert resp.status == 200
        assert server.engine.databases("default") == []
        assert not server.engine._heads and not server.engine._latest
        assert len(reads._heads) < 70  # pruned to the databases that exist, with some slack

    async def test_admin_needs_a_cluster(self, server: Running, http: aiohttp.ClientSession,
                                         history: History) -> None:
        await upload(server, history, 1)
        async with http.get(server.url + "/db/plan?db=app.db", headers={"Authorization": ADMIN}) as resp:
            assert resp.status == 400 and "needs ?cluster=" in (await resp.json())["error"]
        async with http.get(server.url + "/db/plan?db=app.db&cluster=default",
                            headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 200 and json.loads(await resp.read())["txid"] == f"{history.pos.txid:016x}"


class TestPages:
    async def test_pages_are_resolved_from_the_plan(self, server: Running, http: aiohttp.ClientSession,
                                                    history: History, tmp_path: Path) -> None:
        """Every page of the database as of a TXID, from the file holding its newest version, equals the
        restored database's page; a TXID that is not a restore point is 404 ENOTXID."""
        await upload(server, history, 4)
        txid = history.pos.txid
        out = tmp_path / "restored.db"
        await server.engine.restore_to("default", "app.db", out, txid=txid)
        data, ps = out.read_bytes(), history.page_size
        got: dict[int, bytes] = {}
        for first in range(1, len(data) // ps + 1, 3):
            async with http.get(server.url + "/db/pages", headers=AUTH,
                                params={"db": "app.db", "txid": f"{txid:x}", "pgno": str(first), "count": "3"}) as resp:
                assert resp.status == 200 and resp.headers["Cache-Control"].endswith("immutable")
                body = await resp.read()
            pos = 0
            while pos < len(body):
                pgno, level, lo, hi = struct.unpack_from(">IBQQ", body, pos)
                size = 10 + int.from_bytes(body[pos + 27:pos + 31], "big")
                frame = body[pos + 21:pos + 21 + size]
                assert int.from_bytes(frame[:4], "big") == pgno and (level, lo) != (0, 0) and hi <= txid
                got[pgno] = lz4.block.decompress(frame[10:], uncompressed_size=ps)
                pos += 21 + size
        assert sorted(got) == list(range(1, len(data) // ps + 1))
        assert all(got[p] == data[(p - 1) * ps:p * ps] for p in got)
        post = history.pos.post_apply_checksum
        for params, status, code in ((({"txid": "63", "pgno": "1"}), 404, "ENOTXID"),
                                     ({"txid": f"{txid:x}", "pgno": "0"}, 400, "EBADREQUEST"),
                                     ({"txid": f"{txid:x}", "pgno": "1", "count": "1000"}, 400, "EBADREQUEST"),
                                     # another state at this TXID (a database started over): refused
                                     ({"txid": f"{txid:x}", "pgno": "1", "checksum": f"{post ^ 1:x}"}, 404, "ENOTXID"),
                                     ({"txid": f"{txid:x}", "pgno": "1", "checksum": "zz"}, 400, "EBADREQUEST"),
                                     ({"txid": f"{txid:x}", "pgno": "1", "checksum": f"{post:x}"}, 200, None)):
            async with http.get(server.url + "/db/pages", headers=AUTH, params={"db": "app.db", **params}) as resp:
                assert resp.status == status, params
                assert code is None or (await resp.json())["code"] == code, params


def test_plans_and_heads_of_a_database_started_over_are_its_new_ones() -> None:
    """A database deleted and started over can come back with as many files, as many bytes and the same newest TXID
    as before: the read routes' caches of its plans and head follow the index itself, not those counts."""
    from sidecar.engine.index import DbIndex, FileEntry
    from sidecar.server.reads import Reads

    def history(post: int) -> DbIndex:
        return DbIndex([FileEntry(9, 1, 3, 1000, 500, 5, 4096, 0, post), FileEntry(0, 4, 4, 2000, 100, 5, 4096,
                                                                                     post, post + 1)])

    reads = Reads(None)  # type: ignore[arg-type]  # the caches need no engine
    old, new = history(0xA), history(0xB)
    assert (len(old), old.max_txid, old.size) == (len(new), new.max_txid, new.size)
    assert reads._plan_at("c", "app.db", old, 4)[-1].post == 0xB
    assert reads._plan_at("c", "app.db", new, 4)[-1].post == 0xC
    head, _ = reads._latest("c", "app.db", old)
    assert head is not None and head.post_apply_checksum == 0xB
    head, _ = reads._latest("c", "app.db", new)
    assert head is not None and head.post_apply_checksum == 0xC
