"""Hostile and malformed requests: each gets a clear JSON error, and nothing is stored."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from sidecar.ltx import HEADER_SIZE
from sidecar.server.litefs_api import MAX_SNAPSHOTS
from sidecar.storage.layout import set_aside_key
from tests.conftest import LITEFS
from tests.engine.history import History
from tests.server.conftest import ADMIN, OTHER, SNAPSHOT, TOKEN, Running, post, start_server, wait_until


@pytest.mark.parametrize(("auth", "params"), [
    (None, {}), ("wrong-token-0123456789", {}), (f"FlyV1 {TOKEN}x", {}), (f"Bearer {OTHER}", {"cluster": "default"}),
    (f"Basic {TOKEN}", {})])
async def test_bad_credentials_are_refused(server: Running, http: aiohttp.ClientSession, auth: str | None,
                                           params: dict[str, str]) -> None:
    status, body = await post(http, server.url, "app.db", SNAPSHOT, auth, **params)
    assert status == 401 and body["code"] == "EINVALIDAUTH"
    async with http.get(f"{server.url}/pos", headers={"Authorization": auth or ""}, params=params) as resp:
        assert resp.status == 401
    assert server.engine.databases("default") == [] and server.engine.databases("other") == []


async def test_a_token_reaches_only_its_cluster(server: Running, http: aiohttp.ClientSession) -> None:
    assert (await post(http, server.url, "app.db", SNAPSHOT, OTHER))[0] == 200
    async with http.get(f"{server.url}/pos", headers={"Authorization": TOKEN}) as resp:
        assert await resp.json() == {}
    async with http.get(f"{server.url}/pos", headers={"Authorization": f"Bearer {OTHER}"}) as resp:
        assert list(await resp.json()) == ["app.db"]
    async with http.get(f"{server.url}/db/snapshot", params={"db": "app.db"},
                        headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 404


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", ".", "a\\b", "x\x00y", "tab\there", "n" * 256, ""])
async def test_bad_database_names(server: Running, http: aiohttp.ClientSession, name: str) -> None:
    status, body = await post(http, server.url, name, SNAPSHOT)
    assert status == 400 and body["code"] == "EBADDB", body
    assert not list((server.root / "store").rglob("*.ltx"))


async def test_malformed_bodies(server: Running, http: aiohttp.ClientSession) -> None:
    for body in (b"", b"not an ltx file", SNAPSHOT[:-1], SNAPSHOT[:100], SNAPSHOT[:-8] + b"\0" * 8):
        status, reply = await post(http, server.url, "app.db", body)
        assert (status == 400 and reply["code"] == "EBADLTX" and "app.db" in str(reply["error"])) or \
            reply["error"] == "empty request body: want an LTX file", reply
    assert server.engine.pos("default", "app.db").is_zero
    increment = sorted((LITEFS / "uploads").glob("*fx-wal.db-0000000000000011-*.ltx"))[0].read_bytes()
    status, reply = await post(http, server.url, "app.db", increment)  # not a snapshot on an empty database
    assert status == 409 and reply["code"] == "EPOSMISMATCH"
    assert reply["pos"] == {"txid": "0000000000000000", "postApplyChecksum": "0000000000000000"}
    assert not list((server.root / "store").rglob("*.ltx"))


async def test_body_size_limit(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    srv = await start_server(tmp_path, max_body=1000)
    try:
        status, body = await post(http, srv.url, "app.db", SNAPSHOT)
        assert status == 413 and body["code"] == "ETOOLARGE"
    finally:
        await srv.shutdown()


async def test_a_chunked_upload_over_the_limit_is_refused_naming_the_limit(tmp_path: Path,
                                                                           http: aiohttp.ClientSession) -> None:
    """LiteFS sends uploads chunked (no Content-Length): the 413 says the limit it is held to (max_body_size), not
    what was left of it after the header was read."""
    srv = await start_server(tmp_path, max_body=1000)

    async def chunked() -> AsyncIterator[bytes]:
        yield SNAPSHOT

    try:
        async with http.post(f"{srv.url}/db/tx", params={"db": "app.db"}, data=chunked(),
                             headers={"Authorization": TOKEN}) as resp:
            assert resp.status == 413
            body = await resp.json()
        assert body["code"] == "ETOOLARGE" and body["error"] == "request body exceeds 1000 bytes"
    finally:
        await srv.shutdown()


async def test_uploads_held_open_cannot_take_the_servers_memory(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Each upload is within the body limit, but a client holding many open (to new databases) held that many
    bodies in memory: one cluster's bytes in flight are capped at the body limit, and other clusters go on."""
    srv = await start_server(tmp_path, max_body=1 << 20)
    host, port = srv.url.removeprefix("http://").split(":")
    body = SNAPSHOT[:HEADER_SIZE] + bytes(700 << 10)  # a valid header, then bytes the server must buffer
    request = (f"POST /db/tx?db=held.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n"
               f"Content-Length: {len(body) + 1}\r\n\r\n".encode() + body)  # one byte short: never ends
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def hold() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        conns.append((reader, writer))
        writer.write(request)
        await writer.drain()

    try:
        await hold()

        async def refused() -> bool:
            status, reply = await post(http, srv.url, "other.db", body)
            assert status in (400, 503), (status, reply)  # 400: the junk after the header (the first upload not in)
            if status == 503 and reply["code"] == "EBUSY":
                return True
            # On a loaded machine the server may read this upload's body before the held one's, which is then the
            # one refused (answered): hold another.
            try:
                await asyncio.wait_for(conns[-1][0].read(1), 0.05)
            except TimeoutError:
                return False
            await hold()
            return False
        await wait_until(refused)
        assert (await post(http, srv.url, "app.db", SNAPSHOT, OTHER))[0] == 200  # another cluster is not held up
        for _, writer in conns:
            writer.close()
            await writer.wait_closed()

        async def accepted() -> bool:
            return (await post(http, srv.url, "app.db", SNAPSHOT))[0] == 200
        await wait_until(accepted)  # the held upload's bytes are given back when it ends
    finally:
        for _, writer in conns:
            writer.close()
        await srv.shutdown()


async def test_a_cluster_creates_at_most_max_databases(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """Each database costs the server memory, store objects and a share of every tick: a token's holder creating
    them without end would starve the other clusters. Past the ceiling a new name is refused before its body is read;
    the cluster's existing databases and other clusters go on, and a deleted database frees its place."""
    srv = await start_server(tmp_path, max_databases=2)
    try:
        for name in ("a.db", "b.db"):
            assert (await post(http, srv.url, name, SNAPSHOT))[0] == 200
        status, reply = await post(http, srv.url, "c.db", SNAPSHOT)
        assert status == 403 and reply["code"] == "ETOOMANYDBS", reply
        assert "default" in str(reply["error"]) and "2" in str(reply["error"])
        assert srv.engine.databases("default") == ["a.db", "b.db"]
        assert (await post(http, srv.url, "c.db", SNAPSHOT, OTHER))[0] == 200  # another cluster has its own count
        async with http.delete(f"{srv.url}/api/db", params={"db": "a.db", "cluster": "default"},
                               headers={"Authorization": ADMIN}) as resp:
            assert resp.status == 200
        assert (await post(http, srv.url, "c.db", SNAPSHOT))[0] == 200
    finally:
        await srv.shutdown()


async def test_stalled_snapshot_downloads_cannot_fill_the_servers_disk(tmp_path: Path,
                                                                       http: aiohttp.ClientSession) -> None:
    """Each snapshot download is built in a temporary file of the database's size on the state directory's disk,
    held while the client reads: clients that never read, many at once, filled the disk the upload log needs. One
    cluster has at most MAX_SNAPSHOTS downloads at once; another cluster's go on."""
    srv = await start_server(tmp_path)
    history = History(tmp_path / "live.db")
    stalled: list[asyncio.StreamWriter] = []
    try:
        history.con.execute("CREATE TABLE blobs (b BLOB)")
        history.con.execute("BEGIN")
        for _ in range(2000):
            history.con.execute("INSERT INTO blobs VALUES (randomblob(4000))")  # ~8 MiB: more than socket buffers
        history.con.execute("COMMIT")
        await srv.engine.write_tx("default", "app.db", history.commit(1_790_000_000_000))
        assert (await post(http, srv.url, "app.db", SNAPSHOT, OTHER))[0] == 200
        host, port = srv.url.removeprefix("http://").split(":")
        for _ in range(MAX_SNAPSHOTS):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, and never read
            sock.connect((host, int(port)))
            _, writer = await asyncio.open_connection(sock=sock, limit=1024)
            writer.write(f"GET /db/snapshot?db=app.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\r\n"
                         .encode())
            stalled.append(writer)

        async def held() -> bool:  # each stalled download's snapshot built, in its temporary file
            return len(list((tmp_path / "state" / ".tmp").rglob("out"))) == MAX_SNAPSHOTS
        await wait_until(held)

        async def refused() -> bool:
            async with http.get(f"{srv.url}/db/snapshot?db=app.db", headers={"Authorization": TOKEN}) as resp:
                if resp.status == 200:
                    await resp.read()
                    return False
                assert resp.status == 503 and (await resp.json())["code"] == "EBUSY"
                return True
        await wait_until(refused)
        async with http.get(f"{srv.url}/db/snapshot?db=app.db", headers={"Authorization": OTHER}) as resp:
            assert resp.status == 200  # another cluster is not held up
        for writer in stalled:
            writer.close()

        async def served() -> bool:
            async with http.get(f"{srv.url}/db/snapshot?db=app.db", headers={"Authorization": TOKEN}) as resp:
                return resp.status == 200 and len(await resp.read()) > 8_000_000
        await wait_until(served)  # the stalled downloads' places are given back when their clients go
    finally:
        for writer in stalled:
            writer.close()
        history.close()
        await srv.shutdown()


async def test_a_download_whose_client_stopped_reading_is_ended(tmp_path: Path) -> None:
    """A client that stops reading a download held its connection and the snapshot's temporary file for ever: the
    client must take each chunk within request_timeout."""
    srv = await start_server(tmp_path, request_timeout=0.5)
    history = History(tmp_path / "live.db")
    sock = socket.socket()
    try:
        history.con.execute("CREATE TABLE blobs (b BLOB)")
        history.con.execute("BEGIN")
        for _ in range(2000):
            history.con.execute("INSERT INTO blobs VALUES (randomblob(4000))")  # ~8 MiB: more than socket buffers
        history.con.execute("COMMIT")
        await srv.engine.write_tx("default", "app.db", history.commit(1_790_000_000_000))
        host, port = srv.url.removeprefix("http://").split(":")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small, and not read until the end
        sock.connect((host, int(port)))
        reader, writer = await asyncio.open_connection(sock=sock, limit=1024)
        writer.write(f"GET /db/snapshot?db=app.db HTTP/1.1\r\nHost: x\r\nAuthorization: {TOKEN}\r\n\r\n".encode())
        temp = tmp_path / "state" / ".tmp"

        async def built() -> bool:
            return bool(list(temp.rglob("out")))
        await wait_until(built)

        async def released() -> bool:
            return not list(temp.rglob("out"))
        await wait_until(released)
        received = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 16):  # what was in flight, then the end: the server closed it
                received += len(chunk)
        assert received < 8_000_000
        writer.close()
    finally:
        sock.close()
        history.close()
        await srv.shutdown()


async def test_health_ready_and_metrics(server: Running, http: aiohttp.ClientSession) -> None:
    async with http.get(f"{server.url}/healthz") as resp:
        assert resp.status == 200
    async with http.get(f"{server.url}/readyz") as resp:
        assert resp.status == 200
    await post(http, server.url, "app.db", SNAPSHOT)
    await post(http, server.url, "app.db", SNAPSHOT, "nope-nope-nope-nope")
    async with http.get(f"{server.url}/metrics") as resp:
        text = await resp.text()
    assert 'lfsc_uploads_total{cluster="default"} 1.0' in text
    assert 'lfsc_rejections_total{code="EINVALIDAUTH"} 1.0' in text
    assert "lfsc_hwm_lag_txids" in text and "lfsc_request_seconds_bucket" in text
    # The upload went through one group commit of the upload log and was flushed at once (l0_interval 0).
    assert "lfsc_upload_log_commits 1.0" in text and "lfsc_pending_uploads 0.0" in text
    assert 'lfsc_build_seconds_count{level="0"} 1.0' in text and 'level="1"' not in text
    assert await server.engine.compact_level("default", "app.db", 1) is not None
    async with http.get(f"{server.url}/metrics") as resp:
        assert 'lfsc_build_seconds_count{level="1"} 1.0' in await resp.text()


async def test_metrics_count_the_copies_set_aside_per_database(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    """A copy set aside in the store is learned at start and counted under its own database, and only there."""
    srv = await start_server(tmp_path)
    await post(http, srv.url, "app.db", SNAPSHOT)
    await post(http, srv.url, "app.dbx", SNAPSHOT)
    await srv.shutdown()
    copy = tmp_path / "store" / set_aside_key(f"default/app.db/ltx/0/{2:016x}-{2:016x}.ltx", 1_700_000_000_000)
    copy.parent.mkdir(parents=True)
    copy.write_bytes(b"an LTX file of another history")
    srv = await start_server(tmp_path)
    try:
        async with http.get(f"{srv.url}/metrics") as resp:
            text = await resp.text()
    finally:
        await srv.shutdown()
    assert 'lfsc_set_aside_files{cluster="default",db="app.db"} 1.0' in text
    assert 'lfsc_set_aside_files{cluster="default",db="app.dbx"} 0.0' in text


def test_serve_refuses_to_start_without_tokens(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--storage", f"file://{tmp_path}/s",
                           "--state-dir", str(tmp_path / "st")], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "no tokens configured" in proc.stderr
    (tmp_path / "tokens").write_text("default short\n")
    proc = subprocess.run([sys.executable, "-m", "sidecar", "serve", "--tokens", str(tmp_path / "tokens")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "shorter than 16" in proc.stderr


async def test_page_size_change_gap_and_the_backup_stays_intact(server: Running, http: aiohttp.ClientSession,
                                                                 tmp_path: Path) -> None:
    """A page size change (422), a TXID gap (409): refused, and `verify` and a restore still agree."""
    import asyncio

    from sidecar.cli import main
    from tests.engine.history import History
    history = History(tmp_path / "live.db")
    for _ in range(3):
        history.write()
        assert (await post(http, server.url, "app.db", history.commit(1)))[0] == 200
    history.write()
    history.commit(2)  # TXID 4 is never sent
    history.write()
    status, body = await post(http, server.url, "app.db", history.commit(3))
    assert status == 409 and body["code"] == "EPOSMISMATCH" and body["pos"]["txid"] == "0000000000000003"
    other = History(tmp_path / "other.db", page_size=1024)
    for _ in range(4):
        other.write()
        data = other.commit(1)
    from sidecar.ltx import Version
    from sidecar.ltx.decoder import decode
    from sidecar.ltx.encoder import encode
    h, pages, t = decode(data, Version.V2)
    pos = server.engine.pos("default", "app.db")
    forged = encode(h.replace(pre_apply_checksum=pos.post_apply_checksum), pages, Version.V2, t.post_apply_checksum)
    status, body = await post(http, server.url, "app.db", forged)
    assert status == 422 and body["code"] == "EBADHEADER" and "page size 1024" in str(body["error"])
    assert server.engine.pos("default", "app.db") == pos
    out = tmp_path / "out.db"
    result = await server.engine.restore_to("default", "app.db", out, integrity_check=True)
    assert result.txid == 3 and result.checksum == history.checksums[3]
    url = f"file://{server.root / 'store' / 'default' / 'app.db'}"
    assert await asyncio.to_thread(main, ["verify", url]) == 0
    history.close()
    other.close()


@pytest.mark.parametrize("name", ["a\u202eb.db", "zero\u200bwidth.db", " lead.db", "trail.db ", ".hidden",
                                  "e\u0301.db", "line\u2028sep"])
async def test_lookalike_and_unprintable_names_are_refused(server: Running, http: aiohttp.ClientSession,
                                                          name: str) -> None:
    status, body = await post(http, server.url, name, SNAPSHOT)
    assert status == 400 and body["code"] == "EBADDB", body
    assert "U+" in str(body["error"]) or "space" in str(body["error"]) or "dot" in str(body["error"]) \
        or "normal form" in str(body["error"])


async def test_a_clone_onto_itself_is_refused(server: Running, http: aiohttp.ClientSession) -> None:
    """Cloning a database onto itself (the dashboard's form with only the own cluster typed) is a mistake: it would
    append its own state as a new head, and every LiteFS node would pull a snapshot. Refused; the head stays."""
    assert (await post(http, server.url, "app.db", SNAPSHOT))[0] == 200
    before = server.engine.pos("default", "app.db")
    for params in ({"to_cluster": "default"}, {"to_cluster": "default", "to_db": "app.db"}):
        async with http.post(f"{server.url}/api/clone", params={"db": "app.db", **params},
                             headers={"Authorization": TOKEN}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["code"] == "EBADTARGET", body
            assert "default/app.db onto itself" in body["error"]
    assert server.engine.pos("default", "app.db") == before


async def test_a_clone_target_no_token_can_reach_is_refused(server: Running, http: aiohttp.ClientSession) -> None:
    assert (await post(http, server.url, "app.db", SNAPSHOT))[0] == 200
    async with http.post(f"{server.url}/api/clone", params={"db": "app.db", "to_cluster": "bad name",
                                                            "cluster": "default"},
                         headers={"Authorization": ADMIN}) as resp:
        body = await resp.json()
        assert resp.status == 400 and body["code"] == "EBADDB" and "white space" in body["error"]
        assert body["error"].startswith("to_cluster: ")
    for params, error in (({"to_cluster": ""}, "missing ?to_cluster="),
                          ({"to_cluster": "qa", "to_db": ".x"}, "to_db: invalid database name '.x'")):
        async with http.post(f"{server.url}/api/clone", params={"db": "app.db", "cluster": "default", **params},
                             headers={"Authorization": ADMIN}) as resp:
            body = await resp.json()
            assert resp.status == 400 and body["code"] == "EBADDB" and body["error"].startswith(error), body
    assert server.engine.clusters() == ["default"]
