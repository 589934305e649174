"""The engine against a failing store: nothing acknowledged is lost, the HWM never passes what is durable."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from sidecar.cli import main
from sidecar.engine import Engine, Levels, plan_restore, restore, scan
from sidecar.errors import RestoreError, StorageError
from sidecar.ltx import LTXError, Version
from sidecar.ltx.sqlite import encode_db
from sidecar.storage import FILE_LAYOUT, open_storage
from sidecar.storage.file import FileStorage
from sidecar.storage.s3 import S3Storage
from tests.engine.history import History
from tests.faults import FaultProxy
from tests.s3server import MotoServer
from tests.server.conftest import wait_until

T0 = 1_790_000_000.0


@pytest.fixture
async def proxied(moto_server: MotoServer) -> AsyncIterator[tuple[S3Storage, FaultProxy]]:
    proxy = FaultProxy(moto_server.url)
    url = await proxy.start()
    store = S3Storage(moto_server.create_bucket(), "", endpoint_url=url, force_path_style=True, max_attempts=3,
                      backoff_base=0.001, backoff_cap=0.005)
    yield store, proxy
    await store.close()
    await proxy.stop()


async def test_outage_keeps_uploads_and_holds_the_hwm(proxied: tuple[S3Storage, FaultProxy], history: History,
                                                      tmp_path: Path) -> None:
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    history.write()
    await engine.write_tx("c", "app.db", history.commit(1))
    now[0] += 10
    await engine.tick()
    assert engine.hwm("c", "app.db") == 1
    proxy.faults.down = True
    for _ in range(5):
        history.write()
        assert await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000))) == 1
        now[0] += 4
    await engine.tick()  # the flush fails alone: recorded on the database; uploads stay pending, the HWM stays
    assert engine.status("c", "app.db").failing
    assert engine.hwm("c", "app.db") == 1
    assert engine.pos("c", "app.db") == history.pos
    # A crash during the outage: a new engine finds every acknowledged upload.
    engine.abandon()
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    # The index cache is written every few seconds, so it may not know file 1 yet: the HWM is never above what is
    # stored (at most lower, which only makes clients keep files longer) until the store answers again.
    assert engine.pos("c", "app.db") == history.pos and engine.hwm("c", "app.db") <= 1
    proxy.faults.down = False
    proxy.faults.slowdown_every = 2  # flaky, but each call gets through within its retries
    now[0] += 20
    await engine.tick()
    assert engine.hwm("c", "app.db") == history.pos.txid
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db", integrity_check=True)
    assert result.checksum == history.checksums[history.pos.txid]


class DownStore(FileStorage):
    """A local store whose LTX file writes fail while `down` is set (its lease is taken, its flushes fail)."""

    down = False

    async def put_bytes(self, key: str, data: bytes, *, timestamp: int | None = None,
                        if_none_match: bool = False, if_match: str | None = None) -> str:
        if self.down and "/ltx/" in key:
            raise StorageError(key, "store down (test)", retryable=True)
        return await super().put_bytes(key, data, timestamp=timestamp, if_none_match=if_none_match,
                                       if_match=if_match)

    async def put_file(self, key: str, path: str | os.PathLike[str], *, timestamp: int | None = None,
                       if_none_match: bool = False, if_match: str | None = None) -> str:
        if self.down and "/ltx/" in key:
            raise StorageError(key, "store down (test)", retryable=True)
        return await super().put_file(key, path, timestamp=timestamp, if_none_match=if_none_match,
                                      if_match=if_match)


@pytest.mark.parametrize("l0_interval", [0.0, 3600.0], ids=["every upload flushed", "a big upload flushed"])
async def test_an_upload_whose_inline_flush_failed_is_acknowledged_and_flushed_once_the_store_answers(
        history: History, tmp_path: Path, l0_interval: float) -> None:
    """An upload flushed as it arrives (l0_interval 0, or over 8 MiB) is in the upload log and has moved the
    position before the flush fails: it is acknowledged (a 503 would send a client back to find nothing to resend,
    or the sidecar to re-ship it for a 409) and its flush retried with the others, not left until the next upload."""
    store = DownStore(tmp_path / "store")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=l0_interval))
    stop = asyncio.Event()
    ticker = asyncio.create_task(engine.run(stop))
    try:
        if l0_interval:  # a snapshot over 8 MiB: flushed as it arrives whatever the interval
            history.con.execute("INSERT INTO events (at, body) VALUES (1, hex(randomblob(5000000)))")
        else:  # every upload flushed as it arrives: one in the store first
            history.write()
            assert await engine.write_tx("c", "app.db", history.commit(int(time.time() * 1000))) == 1
            history.write()
        upload = history.commit(int(time.time() * 1000), compress=False)
        assert (len(upload) > 8 << 20) == bool(l0_interval)
        store.down = True
        stored_before = history.pos.txid - 1
        assert await engine.write_tx("c", "app.db", upload) == stored_before  # the HWM of what the store holds
        assert engine.pos("c", "app.db") == history.pos and engine.status("c", "app.db").failing
        store.down = False

        async def stored() -> bool:
            return engine.hwm("c", "app.db") == history.pos.txid
        await wait_until(stored, within=20)
    finally:
        stop.set()
        await ticker
        await engine.close()
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
    assert result.checksum == history.checksums[history.pos.txid]


async def test_closing_while_the_store_is_down_keeps_uploads_for_the_next_start(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
    proxy.faults.down = True
    await engine.close()  # the flush fails: a warning, not an error, and the uploads stay in the upload log
    assert list((tmp_path / "state" / "log").glob("*.log"))
    proxy.faults.down = False
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    assert engine.pos("c", "app.db") == history.pos and engine.hwm("c", "app.db") == 0
    await engine.close()
    assert not list((tmp_path / "state" / "log").glob("*.log"))  # flushed, so the log is gone
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    assert engine.hwm("c", "app.db") == history.pos.txid
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
    assert result.checksum == history.checksums[history.pos.txid]
    await engine.close()


async def test_closing_on_a_hung_store_ends_at_its_timeout_and_keeps_the_uploads(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    """A store that takes PUTs and never answers (`run` and `serve` stopping while it hangs): the flush on close
    gives up at `timeout`, within the platform's kill timeout, and the uploads wait in the upload log."""
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
    proxy.faults.hold_puts = "/c/app.db/"
    with structlog.testing.capture_logs() as logs:
        await asyncio.wait_for(engine.close(within=0.5), 30)  # each held PUT would wait 60 s, and be retried
    assert any("upload log" in e["event"] and e.get("uploads") == 3 for e in logs), logs
    proxy.faults.hold_puts = ""
    proxy.faults.release.set()  # the abandoned PUT lands after all: the store is the truth the next start reads

    async def landed() -> bool:
        return proxy.faults.held == 0 and any(o.key.endswith(".ltx") for o in await store.list("c/app.db/"))
    await wait_until(landed, within=20)
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    assert engine.pos("c", "app.db") == history.pos
    await engine.close()
    result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
    assert result.checksum == history.checksums[history.pos.txid]


async def test_a_crash_after_a_snapshot_over_pending_uploads_still_opens_while_the_store_is_down(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    """Replaying the upload log writes nothing to the store: a snapshot logged after other uploads opens from the
    cache while the store is down, and reaches the store as its own file once it answers."""
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    for _ in range(3):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
    history.write()
    with open(history.path, "rb") as f, open(tmp_path / "snap.ltx", "wb") as out:
        encode_db(f, out, version=Version.V2, compress=True, txid=5, timestamp=int(now[0] * 1000))
    assert await engine.write_tx("c", "app.db", (tmp_path / "snap.ltx").read_bytes()) == 3  # 1-3 flushed first
    snap_pos = engine.pos("c", "app.db")
    engine.abandon()  # a crash before the index cache was written
    proxy.faults.down = True
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    assert engine.pos("c", "app.db") == snap_pos
    proxy.faults.down = False
    now[0] += 3600
    await engine.tick()
    assert [(e.min_txid, e.max_txid) for e in engine.index("c", "app.db").level(0)] == [(1, 3), (1, 5)]
    result = await engine.restore_to("c", "app.db", tmp_path / "3.db", txid=3)
    assert result.checksum == history.checksums[3]
    await engine.close()


async def test_gap_in_the_store_is_refused_clearly(history: History, tmp_path: Path) -> None:
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0))
    for _ in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1000))
    middle = engine.index("c", "app.db").level(0)[2]
    (tmp_path / "store" / middle.key(FILE_LAYOUT, "c/app.db")).unlink()
    index = await scan(store, "c/app.db")
    with pytest.raises(RestoreError, match=r"gap: TXIDs 0000000000000003\.\.0000000000000003 are missing"):
        plan_restore(index)
    out = tmp_path / "out.db"
    url = f"file://{tmp_path / 'store' / 'c' / 'app.db'}"
    assert await asyncio.to_thread(main, ["restore", "-o", str(out), url]) == 1
    assert not out.exists()
    assert plan_restore(index, txid=2)[-1].max_txid == 2  # what precedes the gap still restores


async def test_a_file_whose_name_and_header_disagree_is_named(history: History, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Every reader finds a file by its name (Litestream too): a header of another range is a bad file, named by
    its key; verify does not take the file its header points at for one deleted by retention and say ok."""
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0))
    for _ in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1000))
    await engine.close()
    level0 = tmp_path / "store" / "c" / "app.db" / "ltx" / "0"
    (level0 / "0000000000000003-0000000000000003.ltx").rename(level0 / "0000000000000003-0000000000000004.ltx")
    with pytest.raises(LTXError, match=r"0000000000000003-0000000000000004\.ltx: header covers TXIDs "
                                      r"0000000000000003-0000000000000003, not the 0000000000000003-0000000000000004"):
        await scan(store, "c/app.db")
    url = f"file://{tmp_path / 'store' / 'c' / 'app.db'}"
    assert await asyncio.to_thread(main, ["verify", url]) == 1
    assert "ltx/0/0000000000000003-0000000000000004.ltx: header covers" in capsys.readouterr().err


async def test_a_corrupt_file_on_s3_is_named_by_its_key(moto_server: MotoServer, history: History, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A restore from S3 merges downloads: its error names the stored file, not the download's local name, and the
    existing output is left as it was."""
    bucket = moto_server.create_bucket()
    s3 = {"endpoint_url": moto_server.url, "force_path_style": True}
    store = open_storage(f"s3://{bucket}/b", **s3)
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0))
    for _ in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1000))
    await engine.close()
    newest = (await scan(store, "c/app.db")).level(0)[-1]
    key = newest.key(store.layout, "c/app.db")
    data = bytearray(await store.get_bytes(key))
    data[120] ^= 0xFF
    await store.put_bytes(key, bytes(data))
    await store.close()
    out = tmp_path / "out.db"
    out.write_bytes(b"the old database")
    argv = ["restore", "--s3-endpoint", moto_server.url, "--s3-force-path-style", "-o", str(out),
            f"s3://{bucket}/b/c/app.db"]
    assert await asyncio.to_thread(main, argv) == 1
    name = newest.key(store.layout, "")
    assert f"corrupt backup file: {name}: file checksum mismatch" in capsys.readouterr().err
    assert out.read_bytes() == b"the old database"


class _RetentionAfterList:
    """A store whose retention deletes `victim` right after each LIST: a restore scanning a live backup."""

    def __init__(self, inner: Any, victim: str) -> None:
        self.inner, self.victim = inner, victim

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "") -> Any:
        objects = await self.inner.list(prefix)
        await self.inner.delete([self.victim])
        return objects


async def test_a_file_deleted_between_the_list_and_its_header_read_is_left_out(history: History,
                                                                               tmp_path: Path) -> None:
    """Retention deleting a file the scan has listed (an L0 flush an L1 file covers) does not fail the restore."""
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0))
    for _ in range(4):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1000))
    await engine.compact_level("c", "app.db", 1)
    history.write()
    await engine.write_tx("c", "app.db", history.commit(2000))
    await engine.close()
    covered = (await scan(store, "c/app.db")).level(0)[1]
    racing = _RetentionAfterList(store, covered.key(store.layout, "c/app.db"))
    index = await scan(racing, "c/app.db")
    assert covered not in list(index)
    result = await restore(store, "c/app.db", plan_restore(index), tmp_path / "out.db")
    assert result.txid == history.pos.txid and result.checksum == history.checksums[history.pos.txid]


async def test_closing_flushes_every_database_even_when_one_fails(tmp_path: Path) -> None:
    """A database whose flush the store refuses keeps only its own uploads out of the store at close, not others'."""
    store = open_storage(f"file://{tmp_path / 'store'}")
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    histories = {name: History(tmp_path / name, seed=i) for i, name in enumerate(("a.db", "b.db"))}
    for name, h in histories.items():
        h.write()
        await engine.write_tx("c", name, h.commit(int(now[0] * 1000)))
    # An object already at a.db's next L0 key (a late write of a previous owner): its flush is refused.
    await store.put_bytes(store.layout.ltx_key("c/a.db", 0, 1, 1), b"not ours")
    await engine.close()
    assert engine.hwm("c", "a.db") == 0
    assert engine.hwm("c", "b.db") == 1 and engine.status("c", "b.db").pending_files == 0
    for h in histories.values():
        h.close()


async def test_a_cluster_named_log_keeps_its_uploads_over_a_start_while_the_store_is_down(
        proxied: tuple[S3Storage, FaultProxy], history: History, tmp_path: Path) -> None:
    """Cluster `log`'s cached indexes sit beside the upload log's segments: they are read at a start while the store
    is down like any other cluster's, so its acknowledged uploads still continue them."""
    store, proxy = proxied
    now = [T0]
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    history.write()
    await engine.write_tx("log", "app.db", history.commit(int(now[0] * 1000)))
    await engine.flush("log", "app.db")
    await engine.close()  # the index cache holds file 1
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    history.write()
    await engine.write_tx("log", "app.db", history.commit(int(now[0] * 1000)))  # acknowledged, not stored
    engine.abandon()
    proxy.faults.down = True
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=3600), clock=lambda: now[0])
    assert engine.pos("log", "app.db") == history.pos
    proxy.faults.down = False
    now[0] += 3600
    await engine.tick()
    assert engine.hwm("log", "app.db") == 2
    await engine.close()


async def test_a_corrupt_stored_file_is_named_by_the_compaction_it_fails(history: History, tmp_path: Path) -> None:
    """A stored L0 file damaged in the store (bit rot, a foreign write): L1 compaction fails alone, and its error, in
    the log and in `failing` (/api/databases, the sidecar's /healthz), names the object to look at."""
    now = [T0]
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=10), clock=lambda: now[0])
    try:
        for _ in range(3):
            history.write()
            await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000)))
            now[0] += 10
            await engine.tick()
        *_, damaged = sorted((tmp_path / "store" / "c" / "app.db" / "ltx" / "0").iterdir())  # not yet in L1
        data = bytearray(damaged.read_bytes())
        for i in range(120, len(data) - 40, 7):  # page data, past the header
            data[i] ^= 0xFF
        damaged.write_bytes(bytes(data))
        now[0] += 300
        await engine.tick()
        failing = engine.status("c", "app.db").failing
        assert f"c/app.db/ltx/0/{damaged.name}" in failing["L1"]
    finally:
        await engine.close()
