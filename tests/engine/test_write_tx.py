"""Engine.write_tx beyond contiguity: page sizes, snapshots over pending uploads, big uploads, cancellation, status."""

from __future__ import annotations

import asyncio
import io
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels
from sidecar.engine.accept import WHOLE_LIMIT, check_upload
from sidecar.engine.engine import Backpressure
from sidecar.engine.pagesums import PageSums
from sidecar.errors import PosMismatch
from sidecar.ltx import InvalidHeader, LTXError, Pos, Version
from sidecar.ltx.decoder import decode, decode_v2
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.reader import NotWhole
from sidecar.ltx.sqlite import encode_db
from sidecar.storage import open_storage
from sidecar.storage.file import FileStorage
from tests.engine.history import History

DB = "app.db"
T0 = 1_790_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


OpenEngine = Callable[..., Awaitable[Engine]]


@pytest.fixture
async def open_engine(tmp_path: Path) -> AsyncIterator[OpenEngine]:
    opened: list[Engine] = []

    async def make(levels: Levels | None = None, clock: Clock | None = None) -> Engine:
        engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                                   levels or Levels(l0_interval=3600), clock=clock or Clock())
        opened.append(engine)
        return engine

    yield make
    for engine in opened:
        await engine.close()


def reheader(data: bytes, **fields: int) -> bytes:
    """The same LTX v2 upload with some header fields replaced."""
    header, pages, trailer = decode(data, Version.V2)
    out = io.BytesIO()
    enc = Encoder(out, header.replace(**fields), Version.V2)
    for pgno, page in pages:
        enc.write_page(pgno, page)
    enc.close(trailer.post_apply_checksum)
    return out.getvalue()


def snapshot(path: Path, txid: int) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as db:
        encode_db(db, out, version=Version.V2, compress=True, txid=txid, timestamp=txid * 1000)
    return out.getvalue()


async def ship(engine: Engine, history: History, n: int) -> None:
    for _ in range(n):
        history.write()
        await engine.write_tx("c", DB, history.commit(int(history.pos.txid + 1) * 1000))


class TestPageSize:
    """An upload keeps the database's page size; only a snapshot may change it."""

    async def test_an_increment_with_another_page_size_is_refused(self, tmp_path: Path, history: History,
                                                                 open_engine: OpenEngine) -> None:
        """Refused as an invalid header naming the field and the database; a snapshot may change it."""
        engine = await open_engine()
        await ship(engine, history, 2)
        pos = engine.pos("c", DB)
        big = History(tmp_path / "big.db", page_size=8192)
        try:
            big.write()
            big.commit(1000)
            big.write()
            other = reheader(big.commit(2000), min_txid=pos.txid + 1, max_txid=pos.txid + 1,
                             pre_apply_checksum=pos.post_apply_checksum)
            with pytest.raises(InvalidHeader, match=r"^c/app\.db: page size 8192 differs from the database's 4096$") \
                    as err:
                await engine.write_tx("c", DB, other)
            assert err.value.field == "page_size" and engine.pos("c", DB) == pos
            await engine.write_tx("c", DB, snapshot(big.path, pos.txid + 1))
            assert engine.pos("c", DB) == Pos(pos.txid + 1, big.pos.post_apply_checksum)
            assert engine.status("c", DB).page_size == 8192
        finally:
            big.close()


class TestSnapshots:
    """A snapshot ahead of the position replaces it, after the uploads pending before it are flushed."""

    async def test_pending_uploads_are_flushed_before_a_snapshot(self, history: History, tmp_path: Path,
                                                                open_engine: OpenEngine) -> None:
        """The uploads before the snapshot reach the store as their own file, and both states restore."""
        engine = await open_engine()
        await ship(engine, history, 3)
        assert engine.hwm("c", DB) == 0 and engine.status("c", DB).pending_files == 3
        history.write()
        snap = snapshot(history.path, 5)
        assert await engine.write_tx("c", DB, snap) == 3
        assert engine.status("c", DB).pending_files == 1
        await engine.flush("c", DB)
        assert [(e.min_txid, e.max_txid) for e in engine.index("c", DB)] == [(1, 3), (1, 5)]
        three = await engine.restore_to("c", DB, tmp_path / "3.db", txid=3)
        assert (three.checksum, three.verified) == (history.checksums[3], True)
        five = await engine.restore_to("c", DB, tmp_path / "5.db", txid=5)
        assert five.checksum == decode(snap, Version.V2)[2].post_apply_checksum

    async def test_a_snapshot_one_ahead_is_accepted(self, history: History, open_engine: OpenEngine) -> None:
        """The first TXID beyond the position is ahead."""
        engine = await open_engine()
        await ship(engine, history, 2)
        await engine.write_tx("c", DB, snapshot(history.path, 3))
        assert engine.pos("c", DB).txid == 3


class TestFlushing:
    """When an accepted upload reaches the store."""

    async def test_a_big_upload_is_flushed_at_once(self, tmp_path: Path, open_engine: OpenEngine) -> None:
        """Over 8 MiB an upload is not held in memory until the next flush: the HWM covers it on return."""
        path = tmp_path / "big.db"
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (b BLOB)")
        con.execute("INSERT INTO t VALUES (randomblob(9 << 20))")  # incompressible: the upload stays over 8 MiB
        con.commit()
        con.close()
        data = snapshot(path, 1)
        assert len(data) > 8 << 20
        engine = await open_engine()
        assert await engine.write_tx("c", DB, data) == 1
        assert engine.status("c", DB).pending_files == 0

    async def test_small_uploads_wait_for_the_flush_interval(self, history: History,
                                                            open_engine: OpenEngine) -> None:
        """Under 8 MiB, with an interval, an upload is acknowledged from the upload log and flushed later."""
        engine = await open_engine()
        await ship(engine, history, 1)
        assert engine.hwm("c", DB) == 0 and engine.status("c", DB).pending_files == 1

    async def test_a_one_second_interval_still_waits(self, history: History, open_engine: OpenEngine) -> None:
        """Only an interval of zero flushes at once."""
        engine = await open_engine(Levels(l0_interval=1))
        await ship(engine, history, 1)
        assert engine.hwm("c", DB) == 0

    async def test_interval_zero_flushes_every_upload(self, history: History, open_engine: OpenEngine) -> None:
        """With l0_interval 0 each acknowledgement carries the upload's own TXID as the HWM."""
        engine = await open_engine(Levels(l0_interval=0))
        for txid in (1, 2):
            history.write()
            assert await engine.write_tx("c", DB, history.commit(txid * 1000)) == txid


class TestAcceptance:
    """What the engine records about an accepted upload, and what a caller that goes away leaves."""

    async def test_status_of_an_accepted_upload(self, history: History, open_engine: OpenEngine) -> None:
        """Position, page size and the time of the last upload follow each accepted upload; a refused one leaves
        them, and nothing stays counted as in flight."""
        clock = Clock()
        engine = await open_engine(clock=clock)
        await ship(engine, history, 1)
        clock.now += 5
        history.write()
        second = history.commit(2000)
        await engine.write_tx("c", DB, second)
        st = engine.status("c", DB)
        assert (st.pos, st.page_size, st.last_upload, st.uploading) == (history.pos, 4096, T0 + 5, 0)
        clock.now += 5
        with pytest.raises(PosMismatch):
            await engine.write_tx("c", DB, second)  # a replay
        st = engine.status("c", DB)
        assert (st.pos, st.last_upload, st.uploading) == (history.pos, T0 + 5, 0)

    async def test_one_upload_of_a_database_at_a_time(self, history: History, open_engine: OpenEngine) -> None:
        """While an upload is being verified and logged it counts as in flight, and a second upload of the same
        database is refused with the position (LiteFS sends one at a time); then none is in flight."""
        engine = await open_engine()
        await ship(engine, history, 1)
        history.write()
        first = history.commit(1000)
        task = asyncio.create_task(engine.write_tx("c", DB, first))
        await asyncio.sleep(0)  # it runs up to its first wait: the upload log's commit
        assert engine.status("c", DB).uploading == 1 and engine.busy("c", DB)
        with pytest.raises(PosMismatch, match="another upload of this database is in progress"):
            await engine.write_tx("c", DB, first)
        await task
        assert engine.status("c", DB).uploading == 0 and engine.pos("c", DB) == history.pos

    async def test_a_first_upload_refused_by_back_pressure_leaves_no_database(self, tmp_path: Path,
                                                                             history: History) -> None:
        """503 while the store is behind: the new database's name is not listed (nothing of it is stored) and
        its retry, once the store caught up, starts it as if first."""
        engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                                   Levels(l0_interval=3600), clock=Clock(), max_pending_bytes=1)
        await ship(engine, history, 1)  # acknowledged, not stored: over the ceiling
        other = History(tmp_path / "other.db")
        other.write()
        first = other.commit(1000)
        with pytest.raises(Backpressure, match="retry shortly"):
            await engine.write_tx("c", "new.db", first)
        assert not engine.exists("c", "new.db") and [s.name for s in engine.statuses()] == [DB]
        await engine.flush("c", DB)
        await engine.write_tx("c", "new.db", first)
        assert engine.pos("c", "new.db") == other.pos
        other.close()
        await engine.close()

    async def test_a_cancelled_upload_that_was_logged_stays_accepted(self, history: History,
                                                                    open_engine: OpenEngine) -> None:
        """A request that goes away while its upload is being logged is cancelled only once the upload is
        accepted: the position includes it, as a replay of the log would."""
        engine = await open_engine()
        await ship(engine, history, 1)  # the cluster's lease is held from here on: nothing else to wait for
        history.write()
        task = asyncio.create_task(engine.write_tx("c", DB, history.commit(1000)))
        await asyncio.sleep(0)  # validated, and waiting for the upload log
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert engine.pos("c", DB) == history.pos
        assert engine.status("c", DB).pending_files == 2

    async def test_a_failure_after_the_log_commit_fails_the_request(self, history: History,
                                                                   open_engine: OpenEngine,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
        """The bookkeeping after the upload log's commit runs as the commit's callback; an error there reaches the
        caller of write_tx, not only the event loop's log: the client is not told its upload was accepted."""
        engine = await open_engine()
        await ship(engine, history, 1)
        history.write()

        def broken(*args: object) -> None:
            raise RuntimeError("page checksums could not be updated")
        monkeypatch.setattr(PageSums, "apply", broken)
        with pytest.raises(RuntimeError, match="could not be updated"):
            await engine.write_tx("c", DB, history.commit(1000))
        assert engine.status("c", DB).uploading == 0


    async def test_an_upload_waiting_on_a_deletion_is_refused(self, tmp_path: Path, history: History) -> None:
        """An upload that waited for the database while it was being deleted is refused with a zero position (the
        client sends a snapshot of a new database), and nothing of it reaches the store: the deleted database does
        not come back."""
        storage = GatedDeletes(tmp_path / "store")
        engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=3600), clock=Clock())
        try:
            await ship(engine, history, 1)
            await engine.flush("c", DB)
            db = engine.catalog.require("c", DB)
            deleting = asyncio.create_task(engine.delete_database("c", DB))
            await storage.deleting.wait()  # the deletion holds the database, waiting for the store
            history.write()
            upload = asyncio.create_task(engine.write_tx("c", DB, history.commit(2000)))
            await asyncio.sleep(0)
            assert db.uploading == 1 and db.lock.locked()  # the upload waits for the deletion
            storage.gate.set()
            assert await deleting == 1
            with pytest.raises(PosMismatch, match="deleted") as refused:
                await upload
            assert refused.value.pos == Pos()
            await engine.flush_all()
        finally:
            await engine.close()
        assert not list((tmp_path / "store" / "c").rglob("*.*"))
        again = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state2",
                                  Levels(l0_interval=3600))
        assert not again.exists("c", DB)
        await again.close()


class GatedDeletes(FileStorage):
    """A local store whose deletions wait until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.deleting = asyncio.Event()

    async def delete(self, keys: Sequence[str]) -> None:
        self.deleting.set()
        await self.gate.wait()
        await super().delete(keys)


class TestBadUploads:
    """A malformed upload is refused naming the database, keeping the decoder's field."""

    @pytest.mark.parametrize(("damage", "field"), [
        (lambda d: b"LTX0" + d[4:], "magic"),
        (lambda d: d[:-1], None),
    ], ids=["bad magic", "truncated"])
    async def test_refused_with_the_field(self, history: History, open_engine: OpenEngine,
                                          damage: Callable[[bytes], bytes], field: str | None) -> None:
        engine = await open_engine()
        history.write()
        good = history.commit(1000)
        with pytest.raises(LTXError, match=r"^c/app\.db: invalid LTX upload: ") as err:
            await engine.write_tx("c", DB, damage(good))
        assert err.value.field == field
        assert engine.pos("c", DB).is_zero

    async def test_a_refusal_names_the_upload_and_the_position(self, history: History,
                                                               open_engine: OpenEngine) -> None:
        """PosMismatch says which TXIDs did not continue which position; and, for the right TXID on top of another
        history, both pre-apply checksums."""
        engine = await open_engine()
        await ship(engine, history, 1)
        history.write()
        honest = history.commit(2000)
        late = reheader(honest, min_txid=3, max_txid=3)
        with pytest.raises(PosMismatch, match=r"^app\.db: upload 0000000000000003-0000000000000003 does not continue "
                                              r"TXID 0000000000000001 \(current position 0000000000000001/"):
            await engine.write_tx("c", DB, late)
        forked = reheader(honest, pre_apply_checksum=history.checksums[1] ^ 0xFF)
        pre = decode(forked, Version.V2)[0].pre_apply_checksum
        with pytest.raises(PosMismatch, match=rf"^app\.db: upload 0000000000000002-0000000000000002 has pre-apply "
                                              rf"checksum {pre:016x}, not the current {history.checksums[1]:016x} "):
            await engine.write_tx("c", DB, forked)



class TestVerifyingLargeFrames:
    """An upload is decoded whole in memory only up to WHOLE_LIMIT of pages; LZ4 expands up to 255 times, so a
    small body may stand for far more, and that one is verified streaming: as strictly, in bounded memory."""

    @staticmethod
    def zeros_db(path: Path) -> None:
        con = sqlite3.connect(path)
        con.execute("CREATE TABLE t (b BLOB)")
        con.execute("INSERT INTO t VALUES (zeroblob(6 << 20))")  # 6 MiB of pages that compress to nearly nothing
        con.commit()
        con.close()

    async def test_it_is_accepted_when_right(self, tmp_path: Path, open_engine: OpenEngine) -> None:
        self.zeros_db(tmp_path / "zeros.db")
        data = snapshot(tmp_path / "zeros.db", 1)
        assert len(data) < 256 << 10
        with pytest.raises(NotWhole):
            decode_v2(data, limit=WHOLE_LIMIT)
        checked = check_upload(data, "c/app.db")
        _, pages, _ = decode(data, Version.V2)
        assert len(checked.crcs) == len(pages) > WHOLE_LIMIT // 4096
        engine = await open_engine()
        await engine.write_tx("c", DB, data)
        assert engine.pos("c", DB).txid == 1

    async def test_it_is_refused_when_its_checksum_is_wrong(self, tmp_path: Path, open_engine: OpenEngine) -> None:
        self.zeros_db(tmp_path / "zeros.db")
        data = bytearray(snapshot(tmp_path / "zeros.db", 1))
        data[-1] ^= 1  # the file checksum
        engine = await open_engine()
        with pytest.raises(LTXError, match="file checksum mismatch"):
            await engine.write_tx("c", DB, bytes(data))
        assert engine.pos("c", DB).txid == 0
