"""The LiteFS Cloud protocol against a real server on 127.0.0.1, driven like LiteFS's own backup client."""

from __future__ import annotations

import io
import time
from pathlib import Path

import aiohttp

from sidecar.ltx import Pos, Version
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import decode
from sidecar.ltx.sqlite import Applier
from tests.conftest import LITEFS, make_db
from tests.engine.history import History
from tests.server.client import BackupClient, Node
from tests.server.conftest import ADMIN, TOKEN, Running, start_server, uploads


async def test_replaying_litefs_uploads_restores_the_database(server: Running, http: aiohttp.ClientSession,
                                                              tmp_path: Path) -> None:
    client = BackupClient(http, server.url, f"FlyV1 {TOKEN}")
    assert await client.pos_map() == {}
    for db in ("fx-wal.db", "fx-nocomp.db"):
        for path in uploads(db):
            hwm = await client.write_tx(db, path.read_bytes())
            assert hwm == decode(path.read_bytes(), Version.V2)[0].max_txid  # l0_interval 0: durable at once
        want = (LITEFS / "db" / f"{db}.pos").read_text().strip()
        assert str((await client.pos_map())[db]) == want
        out = tmp_path / db
        await server.engine.restore_to("default", db, out, integrity_check=True)
        assert out.read_bytes() == (LITEFS / "db" / db).read_bytes()
        snap = await client.fetch_snapshot(db)
        header, _, trailer = decode(snap, Version.V2)
        assert header.is_snapshot and f"{header.max_txid:016x}/{trailer.post_apply_checksum:016x}" == want
        with open(tmp_path / f"{db}.fromsnap", "w+b") as f:
            Applier(f).apply(snap, Version.V2)
        assert (tmp_path / f"{db}.fromsnap").read_bytes() == (LITEFS / "db" / db).read_bytes()


async def test_episodes_like_litefs(server: Running, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Snapshot then increments; an outage and a resume; a 409 and recovery by snapshot; the server ahead."""
    history = History(tmp_path / "live.db")
    files = []
    for i in range(6):
        history.write(n=3)
        files.append(history.commit(int(time.time() * 1000) + i))
    node = Node(tmp_path / "node.db", files[:3])
    client = BackupClient(http, server.url, TOKEN)
    # 1. The server knows nothing: the node uploads a snapshot, then increments.
    remote = (await client.pos_map()).get("app.db", Pos())
    remote = await node.sync(client, "app.db", remote)
    assert remote == node.pos == Pos(3, history.checksums[3])
    node.files += files[3:5]
    node.pos = Pos(5, history.checksums[5])
    remote = await node.sync(client, "app.db", remote)
    assert (await client.pos_map())["app.db"] == remote == node.pos
    assert client.instance  # sticky routing header was offered
    # 2. An outage: the server stops (flushing what it accepted); requests fail; it comes back and we resume.
    await server.shutdown()
    node.files.append(files[5])
    node.pos = Pos(6, history.checksums[6])
    try:
        await client.pos_map()
        raise AssertionError("the server is down")
    except aiohttp.ClientError:
        pass
    server2 = await start_server(server.root)
    client.url = server2.url
    remote = (await client.pos_map())["app.db"]
    assert remote == Pos(5, history.checksums[5])
    remote = await node.sync(client, "app.db", remote)
    assert remote == node.pos
    # 3. A 409: the node believes the server is further behind than it is, and recovers by snapshot.
    stale = Pos(4, history.checksums[4])
    remote = await node.sync(client, "app.db", stale)  # uploads 5..6 again → 409 → GET /db/snapshot
    assert remote == Pos(6, history.checksums[6]) and node.pos == remote
    # 4. An operator restore to TXID 3 appends that state as TXID 7: the node finds the server ahead.
    async with http.post(f"{server2.url}/api/restore", params={"db": "app.db"}, json={"txid": "0000000000000003"},
                         headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["restored"]["txid"] == "0000000000000003" and body["txid"] == "0000000000000007"
    remote = (await client.pos_map())["app.db"]
    assert remote.txid == 7
    remote = await node.sync(client, "app.db", remote)
    assert node.pos == remote
    restored3 = tmp_path / "r3.db"
    await server2.engine.restore_to("default", "app.db", restored3, txid=3)
    assert node.path.read_bytes() == restored3.read_bytes()
    # History is kept: TXID 6 still restores, so the restore can be undone.
    r6 = await server2.engine.restore_to("default", "app.db", tmp_path / "r6.db", txid=6)
    assert r6.checksum == history.checksums[6]
    await server2.shutdown()
    history.close()


async def test_concurrent_uploads_never_interleave(server: Running, http: aiohttp.ClientSession,
                                                   tmp_path: Path) -> None:
    import asyncio
    history = History(tmp_path / "live.db")
    first = history.commit(1)
    client = BackupClient(http, server.url, TOKEN)
    await client.write_tx("app.db", first)
    history.write(n=50)
    nxt = history.commit(2)
    results = await asyncio.gather(*(client.write_tx("app.db", nxt) for _ in range(5)), return_exceptions=True)
    ok = [r for r in results if not isinstance(r, BaseException)]
    assert len(ok) == 1 and all("position mismatch" in str(r) for r in results if isinstance(r, BaseException))
    assert server.engine.pos("default", "app.db") == history.pos
    history.close()


async def test_admin_api_lists_downloads_uploads_clones_deletes(server: Running, http: aiohttp.ClientSession,
                                                                tmp_path: Path) -> None:
    import sqlite3
    for path in uploads("fx-wal.db"):
        await BackupClient(http, server.url, TOKEN).write_tx("fx-wal.db", path.read_bytes())
    h = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(f"{server.url}/api/databases", headers=h) as resp:
        data = await resp.json()
    [cluster] = data["clusters"]
    assert cluster["name"] == "default" and cluster["databases"][0]["name"] == "fx-wal.db"
    assert cluster["databases"][0]["restorePoints"] >= 5
    async with http.get(f"{server.url}/api/download", params={"db": "fx-wal.db", "cluster": "default"},
                        headers=h) as resp:
        assert resp.status == 200
        (tmp_path / "dl.db").write_bytes(await resp.read())
    assert (tmp_path / "dl.db").read_bytes() == (LITEFS / "db" / "fx-wal.db").read_bytes()
    con = sqlite3.connect(tmp_path / "new.db")
    con.execute("CREATE TABLE x (a)")
    con.execute("INSERT INTO x VALUES (42)")
    con.commit()
    con.close()
    async with http.post(f"{server.url}/api/upload", params={"db": "fx-wal.db"}, headers={"Authorization": TOKEN},
                         data=(tmp_path / "new.db").read_bytes()) as resp:
        assert resp.status == 200, await resp.text()
    out = tmp_path / "after.db"
    await server.engine.restore_to("default", "fx-wal.db", out, integrity_check=True)
    assert out.read_bytes() == (tmp_path / "new.db").read_bytes()
    async with http.post(f"{server.url}/api/clone", params={"db": "fx-wal.db", "cluster": "default",
                                                            "to_cluster": "other"}, headers=h) as resp:
        assert resp.status == 200, await resp.text()
    await server.engine.restore_to("other", "fx-wal.db", tmp_path / "clone.db")
    assert (tmp_path / "clone.db").read_bytes() == (tmp_path / "new.db").read_bytes()
    async with http.delete(f"{server.url}/api/db", params={"db": "fx-wal.db", "cluster": "other"},
                           headers=h) as resp:
        assert resp.status == 200 and (await resp.json())["deleted"] >= 1
    assert server.engine.databases("other") == []
    assert not list((server.root / "store" / "other").rglob("*.ltx"))


async def test_a_refused_first_upload_leaves_no_database(server: Running, http: aiohttp.ClientSession,
                                                          tmp_path: Path) -> None:
    """An upload refused for a database never stored (here TXID 2 with no TXID 1; or a restore whose database is
    deleted under it) leaves no empty database in the operator's list: only what the store holds is listed."""
    history = History(tmp_path / "live.db")
    history.write()
    history.commit(1_790_000_000_000)
    history.write()
    second = history.commit(1_790_000_060_000)
    async with http.post(f"{server.url}/db/tx?db=ghost.db", data=second,
                         headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 409
    h = {"Authorization": f"Bearer {ADMIN}"}
    async with http.get(f"{server.url}/api/databases", headers=h) as resp:
        assert [c["databases"] for c in (await resp.json())["clusters"]] in ([], [[]])
    async with http.get(f"{server.url}/api/db?db=ghost.db&cluster=default", headers=h) as resp:
        assert resp.status == 404

    # A restore appends its state onto the position it read; the database is deleted before that state arrives.
    for path in uploads("fx-wal.db"):
        await BackupClient(http, server.url, TOKEN).write_tx("fx-wal.db", path.read_bytes())
    engine = server.engine
    write_tx = engine.ops.write_tx

    async def deleted_first(cluster: str, name: str, data: bytes) -> int:
        await engine.delete_database(cluster, name)
        return await write_tx(cluster, name, data)
    engine.ops.write_tx = deleted_first
    async with http.post(f"{server.url}/api/restore?db=fx-wal.db", json={"txid": "10"},
                         headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 409, await resp.text()
    assert not engine.exists("default", "fx-wal.db")
    assert engine.databases("default") == []
    history.close()


async def test_preview_lists_every_table(server: Running, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Every table but SQLite's own (`sqlite_` and then anything) is listed; a virtual table of a module the server's
    SQLite lacks (sqlite-vec's vec0 here) without a row count: the preview of the database, which the dashboard asks
    for before every restore, still answers."""
    import sqlite3
    db = tmp_path / "vec.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (a)")
    con.execute("INSERT INTO t VALUES (1)")
    con.execute("CREATE TABLE sqlitebrowser_rename_column_new_table (a)")  # DB Browser's: not one of SQLite's own
    con.execute("PRAGMA writable_schema = ON")  # what an application with sqlite-vec loaded would have created
    con.execute("INSERT INTO sqlite_schema (type, name, tbl_name, rootpage, sql) VALUES ('table', 'vec', 'vec', 0, "
                "'CREATE VIRTUAL TABLE vec USING vec0(embedding float[4])')")
    con.commit()
    con.close()
    h = {"Authorization": TOKEN}
    async with http.post(f"{server.url}/api/upload?db=vec.db", data=db.read_bytes(), headers=h) as resp:
        assert resp.status == 200, await resp.text()
    async with http.get(f"{server.url}/api/preview?db=vec.db&txid=1", headers=h) as resp:
        assert resp.status == 200, await resp.text()
        assert (await resp.json())["tables"] == [{"name": "sqlitebrowser_rename_column_new_table", "rows": 0},
                                                 {"name": "t", "rows": 1}, {"name": "vec", "rows": None}]


def compacted(files: list[bytes]) -> bytes:
    out = io.BytesIO()
    compact(files, out, version=Version.V2)
    return out.getvalue()


async def test_an_uploaded_sqlite_file_that_fails_its_integrity_check_is_refused(server: Running,
                                                                                http: aiohttp.ClientSession,
                                                                                tmp_path: Path) -> None:
    """POST /api/upload of a damaged SQLite file (here a real one cut to half its pages, as a copy taken mid-write
    would be) is refused with 422 naming the upload, and the head stays where it was: LiteFS would pull it."""
    for path in uploads("fx-wal.db"):
        await BackupClient(http, server.url, TOKEN).write_tx("fx-wal.db", path.read_bytes())
    before = server.engine.pos("default", "fx-wal.db")
    whole = make_db(tmp_path / "real.db", rows=3000).read_bytes()
    cut = whole[:len(whole) // 4096 // 2 * 4096]
    for db in ("fx-wal.db", "new.db"):
        async with http.post(f"{server.url}/api/upload", params={"db": db}, headers={"Authorization": TOKEN},
                             data=cut) as resp:
            body = await resp.json()
            assert resp.status == 422 and body["code"] == "ENOTSQLITE", body
            assert f"upload of {db!r}" in body["error"] and "integrity_check" in body["error"]
    assert server.engine.pos("default", "fx-wal.db") == before
    assert server.engine.pos("default", "new.db").is_zero


async def test_a_download_is_named_after_its_database_whatever_its_characters(
        server: Running, http: aiohttp.ClientSession, tmp_path: Path) -> None:
    """Quotes, semicolons and non-ASCII letters in a name: the header still parses, and names it exactly."""
    history = History(tmp_path / "live.db")
    history.write()
    name = 'le "café"; x.db'
    await BackupClient(http, server.url, TOKEN).write_tx(name, history.commit(1))
    history.close()
    async with http.get(f"{server.url}/api/download", params={"db": name, "cluster": "default"},
                        headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
        assert resp.status == 200
        assert resp.content_disposition is not None and resp.content_disposition.filename == name
        assert resp.headers["Content-Disposition"].startswith('attachment; filename="le _caf__; x.db"; ')
