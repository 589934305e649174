"""The state directory is a cache of one store: bound to it, reconciled with it, rebuilt when it disagrees."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from sidecar.engine import Engine, Levels
from sidecar.errors import RestoreError, StorageError
from sidecar.ltx import Pos, Version
from sidecar.ltx.compactor import compact
from sidecar.storage import open_storage
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.layout import IDENTITY_KEY, QUARANTINE_PREFIX, set_aside_key
from tests.engine.history import History

T0 = 1_700_000_000.0
HOUR = 3600.0


class RacedListing:
    """A real store where another engine deletes one listed LTX file right after each LIST (its retention)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.deleted: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        objects = await self.inner.list(prefix)
        victim = next((o.key for o in objects if o.key.endswith(".ltx") and o.key not in self.deleted), None)
        if victim is not None:
            await self.inner.delete([victim])
            self.deleted.append(victim)
        return objects


async def upload(engine: Engine, history: History, n: int, t: float) -> None:
    for _ in range(n):
        history.write()
        await engine.write_tx("c", "app.db", history.commit(int(t * 1000)))


async def lose_the_third_of_five(tmp_path: Path, history: History, t: float) -> tuple[Storage, list[bytes]]:
    """Five uploads, each flushed to its own L0 file (1-1..5-5) by an engine then closed; then 3-3 is deleted
    from the store by hand. Returns the store and the uploads, which the client still holds."""
    store = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: t)
    sent = []
    for _ in range(5):
        history.write()
        sent.append(history.commit(int(t * 1000)))
        assert await engine.write_tx("c", "app.db", sent[-1]) == len(sent)  # each flushed as its own L0 file
    await engine.close()
    lost = engine.index("c", "app.db").level(0)[2]
    assert (lost.min_txid, lost.max_txid) == (3, 3)
    (tmp_path / "store" / lost.key(store.layout, "c/app.db")).unlink()
    return store, sent


class Forked(History):
    """A node's history that shares TXIDs 1 and 2 with the `history` fixture's (the same seed) and differs from 3 on;
    `sent` holds its uploads."""

    sent: list[bytes]


def forked_at_three(tmp_path: Path, history: History, t: float) -> Forked:
    other = Forked(tmp_path / "other.db")
    other.sent = []
    for n in (5, 5, 50, 5, 5):
        other.write(n)
        other.sent.append(other.commit(int(t * 1000)))
    assert other.checksums[2] == history.checksums[2] and other.checksums[3] != history.checksums[3]
    return other


async def set_aside_4_then_5(tmp_path: Path, history: History, now: list[float], levels: Levels,
                             wrap: Any = None) -> tuple[Engine, Forked, list[str]]:
    """Past a lost 3-3, a node of another history sends its 3, 4 and 5 (see
    `test_the_other_history_goes_on_over_stored_files_no_restore_reaches`): the stored 4-4 is set aside at `now`,
    the stored 5-5 1000 s later (the clock moves). Returns the engine (its store wrapped by `wrap`), the node, and the
    keys of the two copies, oldest first."""
    store, _ = await lose_the_third_of_five(tmp_path, history, now[0])
    other = forked_at_three(tmp_path, history, now[0])
    engine = await Engine.open(wrap(store) if wrap else store, tmp_path / "state", levels, clock=lambda: now[0])
    for txid in (3, 4):
        assert await engine.write_tx("c", "app.db", other.sent[txid - 1]) == txid
    now[0] += 1000
    assert await engine.write_tx("c", "app.db", other.sent[4]) == 5
    copies = await set_aside(engine)
    assert [c.rsplit(".", 1)[1] for c in copies] == [str(int(T0 * 1000)), str(int((T0 + 1000) * 1000))]
    return engine, other, copies


async def set_aside(engine: Engine) -> list[str]:
    """The keys under the store's quarantine prefix, oldest first."""
    return sorted((o.key for o in await engine.storage.list(QUARANTINE_PREFIX)), key=lambda k: int(k.rsplit(".")[-1]))


class TestStoreIdentity:
    async def test_identity_is_created_once_and_recorded(self, tmp_path: Path) -> None:
        store = open_storage(f"file://{tmp_path / 'store'}")
        one = await Engine.open(store, tmp_path / "a")
        two = await Engine.open(store, tmp_path / "b")
        ident = json.loads((tmp_path / "store" / IDENTITY_KEY).read_text())
        for state in ("a", "b"):
            assert json.loads((tmp_path / state / "store.json").read_text())["id"] == ident["id"]
        await one.close()
        await two.close()

    async def test_state_of_another_store_is_set_aside_and_rebuilt(self, tmp_path: Path, history: History) -> None:
        """A state directory reused for a new, empty store: nothing of the old store leaks in, uploads start over."""
        now = [T0]
        old = await Engine.open(open_storage(f"file://{tmp_path / 'old'}"), tmp_path / "state",
                                Levels(l0_interval=3600), clock=lambda: now[0])
        await upload(old, history, 3, now[0])
        old.abandon()  # crashed with uploads only in the upload log
        new = await Engine.open(open_storage(f"file://{tmp_path / 'new'}"), tmp_path / "state",
                                Levels(l0_interval=0), clock=lambda: now[0])
        assert new.positions("c") == {}  # the old store's pending uploads are not replayed into this one
        assert list((tmp_path / "state").glob(".discarded-*/log/*.log"))
        fresh = History(tmp_path / "fresh.db")
        fresh.write()
        assert await new.write_tx("c", "app.db", fresh.commit(1)) == 1
        result = await new.restore_to("c", "app.db", tmp_path / "out.db")
        assert result.checksum == fresh.pos.post_apply_checksum
        assert not list((tmp_path / "old").rglob("*.ltx"))
        await new.close()
        fresh.close()


class TestReconcile:
    async def test_a_flush_the_index_never_heard_of_is_found_at_start(self, tmp_path: Path, history: History) -> None:
        """A crash between storing an L0 file and writing the index: the next start lists the store."""
        now = [T0]
        store = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        await upload(engine, history, 2, now[0])
        await engine.close()  # the index cache holds files 1 and 2
        index = tmp_path / "state" / "c" / "app.db" / "index.json"
        stale = index.read_text()
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        await upload(engine, history, 1, now[0])  # file 3 is stored ...
        engine.abandon()  # ... and the process dies before the index cache is written again
        assert index.read_text() == stale
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        assert engine.pos("c", "app.db") == history.pos and engine.hwm("c", "app.db") == 3
        await upload(engine, history, 1, now[0])  # continues without a duplicate or a gap
        assert [(e.min_txid, e.max_txid) for e in engine.index("c", "app.db").level(0)] == [(1, 1), (2, 2), (3, 3),
                                                                                             (4, 4)]
        await engine.close()

    async def test_files_deleted_from_the_store_make_the_position_start_over(self, tmp_path: Path,
                                                                           history: History) -> None:
        """Deleted under a stopped engine: the next start sees an empty store, so clients send a snapshot."""
        now = [T0]
        store = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        await upload(engine, history, 3, now[0])
        await engine.close()
        shutil.rmtree(tmp_path / "store" / "c")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        assert engine.positions("c") == {}
        await engine.close()

    async def test_files_deleted_under_a_running_engine_are_noticed_by_its_jobs(self, tmp_path: Path,
                                                                               history: History) -> None:
        """A compaction that finds its inputs gone rebuilds the index from the store instead of failing forever."""
        now = [T0]
        store = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        await upload(engine, history, 3, now[0])
        shutil.rmtree(tmp_path / "store" / "c")
        await engine.tick()  # L1 finds its inputs gone: the index is marked for a rebuild
        assert "L1" in engine.status("c", "app.db").failing
        await engine.tick()  # rebuilt from the store: nothing there, so the position starts over
        assert engine.pos("c", "app.db").is_zero and engine.hwm("c", "app.db") == 0
        fresh = History(tmp_path / "fresh.db")
        fresh.write()
        await engine.write_tx("c", "app.db", fresh.commit(int(now[0] * 1000)))
        result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
        assert result.checksum == fresh.pos.post_apply_checksum
        await engine.close()
        fresh.close()

    async def test_a_gap_in_the_store_holds_the_hwm_below_it_until_an_upload_fills_it(self, tmp_path: Path,
                                                                                        history: History) -> None:
        """An L0 file lost from the store (deleted by hand): TXIDs past the gap cannot be restored, so the HWM
        answered (what clients prune their local copies under) stops before it, until a re-sent upload fills it."""
        now = [T0]
        store, sent = await lose_the_third_of_five(tmp_path, history, now[0])
        levels = Levels(l0_interval=3600)  # the re-sent upload stays pending: the answer is what the store holds
        with capture_logs() as logs:
            engine = await Engine.open(store, tmp_path / "state", levels, clock=lambda: now[0])
        assert engine.pos("c", "app.db") == Pos(2, history.checksums[2])  # a restore reaches TXID 2, no further
        assert engine.hwm("c", "app.db") == 2  # not 5: TXIDs 3..5 are not restorable
        gap = [e for e in logs if e["event"] == "backup has a gap: the HWM stops before it"]
        assert gap and gap[0]["missing"] == "0000000000000003-0000000000000003" and gap[0]["hwm"] == f"{2:016x}"
        assert "TXIDs 0000000000000003..0000000000000003 are missing" in engine.status("c", "app.db").failing["chain"]
        # The client still holds TXID 3 (the HWM never covered it): it sends it again, and the answer stays at 2
        # while the upload waits for the store.
        assert await engine.write_tx("c", "app.db", sent[2]) == 2
        # Filled: the files past the gap are restorable again, but the answer is not past what the client sent (the
        # stored 4 and 5 could be another history's; the client sends its own next).
        assert await engine.flush("c", "app.db") == 3
        assert engine.index("c", "app.db").hwm == 5
        assert engine.status("c", "app.db").gap == ""
        result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
        assert (result.txid, result.checksum) == (5, history.checksums[5])
        await engine.close()

    async def test_levels_go_on_after_a_gap_is_filled_over_the_files_past_it(self, tmp_path: Path,
                                                                            history: History) -> None:
        """The client sends TXIDs 3..5 again in one upload past a lost L0 file 3-3 while 4-4 and 5-5 are still
        stored: L0 files overlap, and L1, L2 and the snapshot are built from the chain a restore walks, every
        acknowledged TXID in it; L0 retention then deletes the files left out."""
        now = [T0]
        store, sent = await lose_the_third_of_five(tmp_path, history, now[0])
        levels = Levels(l0_interval=0, l0_retention=600)
        engine = await Engine.open(store, tmp_path / "state", levels, clock=lambda: now[0])
        merged = io.BytesIO()
        compact(sent[2:], merged, version=Version.V2)
        assert await engine.write_tx("c", "app.db", merged.getvalue()) == 5
        l0 = [(e.min_txid, e.max_txid) for e in engine.index("c", "app.db").level(0)]
        assert l0 == [(1, 1), (2, 2), (3, 5), (4, 4), (5, 5)]
        await engine.tick()  # L1, L2 and the snapshot are due
        index = engine.index("c", "app.db")
        assert engine.status("c", "app.db").failing == {}
        assert [(e.level, e.min_txid, e.max_txid) for e in index if e.level] == [(1, 1, 5), (2, 1, 5), (9, 1, 5)]
        assert index.newest(1).post == history.checksums[5]  # type: ignore[union-attr]
        now[0] += 700  # past L0 retention and an L1 boundary
        history.write()
        assert await engine.write_tx("c", "app.db", history.commit(int(now[0] * 1000))) == 6
        await engine.tick()
        index = engine.index("c", "app.db")
        assert engine.status("c", "app.db").failing == {}
        assert [(e.level, e.min_txid, e.max_txid) for e in index if e.level < 2] == [(0, 6, 6), (1, 1, 5), (1, 6, 6)]
        for txid in (5, 6):  # from L1 alone now: nothing acknowledged was left out of it
            result = await engine.restore_to("c", "app.db", tmp_path / f"out{txid}.db", txid=txid)
            assert (result.txid, result.checksum) == (txid, history.checksums[txid])
        await engine.close()

    async def test_an_upload_sent_again_that_the_store_holds_is_not_written_again(self, tmp_path: Path,
                                                                                 history: History) -> None:
        """Past a lost L0 file the client sends 3, 4 and 5 again one by one (LiteFS sends from the position it is
        told): 4 and 5 meet the stored 4-4 and 5-5 (write-once), which hold the very same transactions. They count as
        flushed: no failed flush, no index rebuild, no acknowledged upload dropped, no overlapping files."""
        now = [T0]
        store, sent = await lose_the_third_of_five(tmp_path, history, now[0])
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        with capture_logs() as logs:
            assert await engine.write_tx("c", "app.db", sent[2]) == 3  # not past what the client sent
            assert await engine.write_tx("c", "app.db", sent[3]) == 4
            await engine.tick()  # an index rebuild here would drop the acknowledged 4, and refuse 5 (position 5)
            assert await engine.write_tx("c", "app.db", sent[4]) == 5
        assert engine.pos("c", "app.db") == history.pos
        assert [e["event"] for e in logs if e["log_level"] in ("warning", "error")] == []
        assert engine.status("c", "app.db").failing == {}
        # (a routine flush is logged at debug level, below what the tests' logging lets through)
        assert [e.get("already_stored", False) for e in logs if e["event"] == "flushed"] == [True, True]
        index = engine.index("c", "app.db")
        assert [(e.level, e.min_txid, e.max_txid) for e in index.level(0)] == [(0, t, t) for t in range(1, 6)]
        result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
        assert (result.txid, result.checksum) == (5, history.checksums[5])
        await engine.close()

    async def test_an_upload_meeting_a_stored_file_of_another_history_goes_in_a_file_of_its_own(
            self, tmp_path: Path, history: History) -> None:
        """Past a lost L0 file, a node whose TXID 4 differs from the stored one (same 1..3) sends 3, 4 and 5: its 4
        is not taken for the stored 4-4. That flush fails, 4 goes out with 5 as 4-5 over the stored 4-4 and 5-5, and
        L1 and restores follow the client's chain (reaching furthest), every acknowledged TXID of it."""
        now = [T0]
        store, _ = await lose_the_third_of_five(tmp_path, history, now[0])
        other = History(tmp_path / "other.db")  # the same seed: the same first three transactions
        sent = []
        for n in (5, 5, 5, 50, 5):
            other.write(n)
            sent.append(other.commit(int(now[0] * 1000)))
        assert other.checksums[3] == history.checksums[3] and other.checksums[4] != history.checksums[4]
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        # The stored 4-4 and 5-5 continue the same 3 as the node's: no checksum tells that they are not its own. The
        # HWM answered stays at what the node sent, so it keeps its 4 and 5 until they are stored.
        assert [await engine.write_tx("c", "app.db", data) for data in sent[2:]] == [3, 3, 5]
        index = engine.index("c", "app.db")
        assert [(e.min_txid, e.max_txid) for e in index.level(0)] == [(1, 1), (2, 2), (3, 3), (4, 4), (4, 5), (5, 5)]
        assert not (tmp_path / "store" / ".litefs-sidecar" / "quarantine").exists()  # the old 4-4 continues 3
        await engine.tick()
        assert engine.status("c", "app.db").failing == {}
        index = engine.index("c", "app.db")
        assert [(e.min_txid, e.max_txid, e.post) for e in index.level(1)] == [(1, 5, other.checksums[5])]
        result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
        assert (result.txid, result.checksum) == (5, other.checksums[5])
        await engine.close()
        other.close()

    async def test_files_of_another_history_past_a_lost_file_are_not_durable(self, tmp_path: Path,
                                                                            history: History) -> None:
        """Past a lost L0 file 3-3, a node of another history from TXID 3 on (a new primary that never had the old
        3..5) sends its own 3: it applies on TXID 2, but the stored 4-4 and 5-5 apply on the old 3, not on it. The
        HWM (what the client prunes under) stays at 3, and no restore applies the old 4 and 5 on the node's 3."""
        now = [T0]
        store, _ = await lose_the_third_of_five(tmp_path, history, now[0])
        other = forked_at_three(tmp_path, history, now[0])
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        assert engine.hwm("c", "app.db") == 2
        assert await engine.write_tx("c", "app.db", other.sent[2]) == 3  # not 5: the stored 4 and 5 are not its own
        status = engine.status("c", "app.db")
        assert status.hwm == 3 and "apply on another state" in status.failing["chain"]
        result = await engine.restore_to("c", "app.db", tmp_path / "out3.db", txid=3)
        assert (result.txid, result.checksum) == (3, other.checksums[3])
        with pytest.raises(RestoreError, match="0000000000000004-0000000000000004 after it applies on another state"):
            await engine.restore_to("c", "app.db", tmp_path / "out.db")
        await engine.tick()  # L1 holds the node's chain, and stops there
        assert [(e.min_txid, e.max_txid, e.post) for e in engine.index("c", "app.db").level(1)] == [
            (1, 3, other.checksums[3])]
        await engine.close()
        other.close()

    async def test_the_other_history_goes_on_over_stored_files_no_restore_reaches(self, tmp_path: Path,
                                                                               history: History) -> None:
        """The node of another history goes on with its 4 and 5, whose keys the old 4-4 and 5-5 hold (write-once):
        those files, past the HWM and reached by no chain, are set aside under the store's quarantine prefix
        (logged, with their keys) and the node's written in their place; the HWM follows the node's files only as
        they are stored, and L1 and restores hold its history."""
        now = [T0]
        store, _ = await lose_the_third_of_five(tmp_path, history, now[0])
        other = forked_at_three(tmp_path, history, now[0])
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        with capture_logs() as logs:
            for txid in (3, 4, 5):
                assert await engine.write_tx("c", "app.db", other.sent[txid - 1]) == txid
        status = engine.status("c", "app.db")
        assert (status.pos, status.failing) == (other.pos, {})
        set_aside = [e for e in logs if e["event"].startswith("stored file of another history set aside")]
        keys = [f"c/app.db/ltx/0/{t:016x}-{t:016x}.ltx" for t in (4, 5)]
        assert [(e["key"], e["log_level"]) for e in set_aside] == [(k, "warning") for k in keys]
        for e, key in zip(set_aside, keys, strict=True):  # the old files are kept aside, byte for byte
            kept = tmp_path / "store" / e["kept"]
            assert e["kept"].startswith(f".litefs-sidecar/quarantine/{key}.") and kept.stat().st_size > 0
        assert [(e.min_txid, e.max_txid, e.post) for e in engine.index("c", "app.db").level(0)] == [
            (t, t, (history if t < 3 else other).checksums[t]) for t in range(1, 6)]
        await engine.tick()
        assert engine.status("c", "app.db").failing == {}
        assert [(e.min_txid, e.max_txid, e.post) for e in engine.index("c", "app.db").level(1)] == [
            (1, 5, other.checksums[5])]
        result = await engine.restore_to("c", "app.db", tmp_path / "out.db")
        assert (result.txid, result.checksum) == (5, other.checksums[5])
        await engine.close()
        other.close()
        # A new start finds the same: the files set aside are no part of the database.
        engine = await Engine.open(store, tmp_path / "state2", Levels(l0_interval=0), clock=lambda: now[0])
        assert (engine.pos("c", "app.db"), engine.hwm("c", "app.db")) == (other.pos, 5)
        assert engine.status("c", "app.db").failing == {}
        await engine.close()

    async def test_objects_under_a_name_no_database_can_have_are_left_out(self, tmp_path: Path,
                                                                         history: History) -> None:
        """A copy of a cluster's directory beside it ("prod copy") stops neither the start nor the other clusters."""
        now = [T0]
        store = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        history.write()
        await engine.write_tx("prod", "app.db", history.commit(int(now[0] * 1000)))
        await engine.close()
        shutil.copytree(tmp_path / "store" / "prod", tmp_path / "store" / "prod copy")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        assert engine.clusters() == ["prod"] and engine.pos("prod", "app.db") == history.pos
        await engine.close()

    async def test_a_file_deleted_between_the_listing_and_its_header_read_is_left_out(self, tmp_path: Path,
                                                                                     history: History) -> None:
        """Another engine's retention deleting a listed file while this one starts: the start goes on without it."""
        now = [T0]
        store = open_storage(f"file://{tmp_path / 'store'}")
        engine = await Engine.open(store, tmp_path / "state", Levels(l0_interval=0), clock=lambda: now[0])
        await upload(engine, history, 3, now[0])
        await engine.close()
        shutil.rmtree(tmp_path / "state")  # a new state directory: every file's header is read
        raced = RacedListing(store)
        engine = await Engine.open(raced, tmp_path / "state", Levels(l0_interval=0),  # type: ignore[arg-type]
                                   clock=lambda: now[0])
        left = {e.key(store.layout, "c/app.db") for e in engine.index("c", "app.db")}
        assert raced.deleted and len(left) == 2 and not left & set(raced.deleted)
        await engine.close()


class FailingDeletes:
    """A real store whose deletes fail while `failing` is set (a store refusing DeleteObjects for a while)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.failing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def delete(self, keys: list[str]) -> None:
        if self.failing:
            raise StorageError(keys[0], "delete refused", retryable=True)
        await self.inner.delete(keys)


class TestDelete:
    async def test_a_deleted_database_stays_deleted_after_a_restart(self, tmp_path: Path, history: History) -> None:
        """Files an earlier retention pass failed to delete (left out of the index) go with the database, so the
        next start does not bring it back from them."""
        now = [T0]
        levels = Levels(l0_interval=0, l1_interval=60, l0_retention=60)
        store = FailingDeletes(open_storage(f"file://{tmp_path / 'store'}"))
        engine = await Engine.open(store, tmp_path / "state", levels,  # type: ignore[arg-type]
                                   clock=lambda: now[0])
        await upload(engine, history, 3, now[0])
        now[0] += 60
        await engine.tick()  # L1 covers the L0 files
        store.failing = True
        now[0] += 61
        await engine.tick()  # retention drops two L0 files from the index; deleting them fails
        store.failing = False
        await engine.delete_database("c", "app.db")
        await engine.close()
        engine = await Engine.open(store, tmp_path / "state", levels, clock=lambda: now[0])  # type: ignore[arg-type]
        assert not engine.exists("c", "app.db")
        assert not list((tmp_path / "store" / "c").rglob("*.ltx"))
        await engine.close()

    async def test_deleting_a_database_deletes_its_set_aside_copies_and_no_other_databases(
            self, tmp_path: Path, history: History) -> None:
        """The copies of a database's files set aside go with it; those of `app.dbx`, whose prefix starts with
        `app.db`'s, stay."""
        now = [T0]
        engine, other, _ = await set_aside_4_then_5(tmp_path, history, now, Levels(l0_interval=0))
        theirs = set_aside_key(f"c/app.dbx/ltx/0/{4:016x}-{4:016x}.ltx", int(T0 * 1000))
        await engine.storage.put_bytes(theirs, b"a copy of another database's file")
        await engine.delete_database("c", "app.db")
        assert await set_aside(engine) == [theirs]
        await engine.close()
        other.close()


class RefusingSetAsideDeletes(FailingDeletes):
    """A real store that, while `failing`, refuses to delete set-aside copies (and deletes everything else)."""

    async def delete(self, keys: list[str]) -> None:
        if self.failing and any(k.startswith(QUARANTINE_PREFIX) for k in keys):
            raise StorageError(keys[0], "delete refused", retryable=True)
        await self.inner.delete(keys)


class TestSetAsideExpiry:
    async def test_copies_older_than_the_snapshot_retention_go_younger_ones_stay_also_after_a_restart(
            self, tmp_path: Path, history: History) -> None:
        """Retention deletes a copy once older than the snapshot retention, and not before: until then it costs no
        request. A restart learns the copies left from one listing (and warns of them), and they still expire."""
        now = [T0]
        levels = Levels(l0_interval=0, snapshot_retention=HOUR)
        engine, other, (older, younger) = await set_aside_4_then_5(tmp_path, history, now, levels)
        assert engine.status("c", "app.db").set_aside == 2
        await engine.tick()  # compactions
        requests = sum(engine.store_stats().count.values())
        while now[0] < T0 + HOUR:  # both copies within the retention: idle, no request
            now[0] = min(now[0] + 300, T0 + HOUR)
            await engine.tick()
        assert sum(engine.store_stats().count.values()) == requests
        assert await set_aside(engine) == [older, younger]
        now[0] = T0 + HOUR + 1  # the older copy is past the retention
        with capture_logs() as logs:
            await engine.tick()
        assert await set_aside(engine) == [younger]
        assert [e["deleted"] for e in logs if e["event"].startswith("set-aside files deleted")] == [1]
        assert engine.status("c", "app.db").set_aside == 1
        await engine.close()
        with capture_logs() as logs:
            engine = await Engine.open(engine.storage, tmp_path / "state", levels, clock=lambda: now[0])
        assert [(e["log_level"], e["files"], e["under"]) for e in logs if e["event"].startswith(
            "stored files set aside")] == [("warning", 1, ".litefs-sidecar/quarantine/c/app.db/")]
        assert engine.status("c", "app.db").set_aside == 1
        now[0] = T0 + 1000 + HOUR + 1
        await engine.tick()
        assert await set_aside(engine) == []
        assert (engine.status("c", "app.db").set_aside, engine.status("c", "app.db").failing) == (0, {})
        await engine.close()
        other.close()

    async def test_a_copy_the_store_fails_to_delete_is_retried_and_holds_no_retention_back(
            self, tmp_path: Path, history: History) -> None:
        """A failed delete of an expired copy is logged and shown as the database's failing `set_aside` job; the
        retention of its LTX files goes on in the same pass, and a later pass deletes the copy."""
        now = [T0]
        levels = Levels(l0_interval=0, l1_interval=60, l0_retention=60, snapshot_retention=HOUR)
        engine, other, (older, younger) = await set_aside_4_then_5(tmp_path, history, now, levels,
                                                                   RefusingSetAsideDeletes)
        store = engine.storage
        assert isinstance(store, RefusingSetAsideDeletes)
        store.failing = True
        now[0] = T0 + HOUR + 1
        with capture_logs() as logs:
            await engine.tick()  # L1 covers the L0 files: all but the newest go; the older copy's delete fails
        assert len(engine.index("c", "app.db").level(0)) == 1
        assert not list((tmp_path / "store" / "c").glob("app.db/ltx/0/0000000000000001-*"))
        assert await set_aside(engine) == [older, younger]
        assert list(engine.status("c", "app.db").failing) == ["set_aside"]
        assert [e["job"] for e in logs if e["event"] == "job failed"] == ["set_aside"]
        store.failing = False
        now[0] += 60  # past the backoff
        await engine.tick()
        assert await set_aside(engine) == [younger]
        assert engine.status("c", "app.db").failing == {}
        await engine.close()
        other.close()
