"""The index at scale: what a flush does to a day's index costs O(1) or O(plan), never O(files), and gives
exactly what the full computation gives; the index cache is a journal that reads back to the same index."""

from __future__ import annotations

import array
import json
import random
from pathlib import Path

from sidecar.engine import DbIndex, FileEntry
from sidecar.engine import head as heads
from sidecar.engine.index import JOURNAL_MIN, IndexCache
from sidecar.engine.pagesums import FILE, PageSums
from sidecar.ltx import Pos


def entry(level: int, lo: int, hi: int, t: int = 0, size: int = 100) -> FileEntry:
    """A file of one history, whose database checksum at TXID t is t: it applies on the state at lo - 1."""
    return FileEntry(level, lo, hi, t, size, 10, 4096, lo - 1, hi)


def day_of_files(rng: random.Random, flushes: int) -> list[FileEntry]:
    """A snapshot, then L0 files of 1-5 TXIDs, an L1 file over every 30 of them and an L2 over every 12 L1."""
    out = [entry(9, 1, 1)]
    tx, l0, l1 = 1, [], []
    for i in range(flushes):
        n = rng.randint(1, 5)
        e = entry(0, tx + 1, tx + n, i * 10_000)
        out.append(e)
        l0.append(e)
        tx += n
        if len(l0) == 30:
            l1.append(entry(1, l0[0].min_txid, l0[-1].max_txid, l0[-1].timestamp))
            out.append(l1[-1])
            l0 = []
            if len(l1) == 12:
                out.append(entry(2, l1[0].min_txid, l1[-1].max_txid, l1[-1].timestamp))
                l1 = []
    return out


def totals(index: DbIndex) -> tuple[int, int, int]:
    files = [e for files in index.levels.values() for e in files]
    return max((e.max_txid for e in files), default=0), sum(e.size for e in files), len(files)


def test_cached_totals_and_order_follow_every_add_and_remove() -> None:
    rng = random.Random(1)
    files = day_of_files(rng, 400)
    index = DbIndex()
    for e in rng.sample(files, len(files)):  # any order: added in place, not only at the end
        index.add(e)
        assert (index.max_txid, index.size, len(index)) == totals(index)
    for files_of_level in index.levels.values():
        assert files_of_level == sorted(files_of_level, key=lambda e: (e.min_txid, e.max_txid))
    assert list(index) == list(DbIndex(files))
    index.remove(rng.sample(files, 100))
    assert (index.max_txid, index.size, len(index)) == totals(index)


def test_a_flush_extends_the_head_exactly_as_planning_again_would() -> None:
    """`extended` (a flush's new head, from the last one) equals `latest` (planned from the whole index) at every
    flush, across compactions (which plan again) and a gap (where extending must not be used)."""
    rng = random.Random(2)
    index = DbIndex()
    prev: heads.Head | None = None
    extended = 0
    for e in day_of_files(rng, 800):
        index.add(e)
        full = heads.latest(index)
        if e.level == 0:
            quick = heads.extended(prev, e, index)
            if quick is not None:
                extended += 1
                assert quick == full
        prev = full
    assert extended > 700  # the usual case is the quick one
    # After a gap the newest file does not continue the head: no extension, and planning again finds no chain.
    gap = entry(0, index.max_txid + 5, index.max_txid + 6)
    index.add(gap)
    assert heads.extended(prev, gap, index) is None
    # A file that continues the head while a newer one already sits above it is no plain extension either.
    above = DbIndex([entry(9, 1, 1), entry(0, 2, 3), entry(0, 6, 7)])
    head = heads.latest(above)
    fill = entry(0, 4, 5)
    above.add(fill)
    assert heads.extended(head, fill, above) is None
    assert heads.latest(above) is not None and heads.latest(above).txid == 7  # type: ignore[union-attr]


def save(cache: IndexCache, index: DbIndex) -> None:
    cache.plan(index)()


def test_the_cache_journals_changes_and_reads_back_the_same_index(tmp_path: Path) -> None:
    rng = random.Random(3)
    files = day_of_files(rng, 600)
    path = tmp_path / "index.json"
    cache = IndexCache(path)
    index = DbIndex(files[:300])
    save(cache, index)  # first save: the whole index
    whole = path.read_bytes()
    for e in files[300:]:
        index.add(e)
        save(cache, index)
        assert path.read_bytes() == whole or not cache.journal.exists()  # appended, or written whole once
        loaded = DbIndex.load(path)
        assert loaded is not None and list(loaded) == list(index)
    index.remove(files[1:50])
    save(cache, index)
    assert list(DbIndex.load(path) or []) == list(index)
    # Past as many journal lines as files (at least JOURNAL_MIN), index.json is written whole and the journal
    # starts again.
    lines = len(cache.journal.read_text().splitlines()) if cache.journal.exists() else 0
    assert lines <= max(JOURNAL_MIN, len(index)) + 1


def test_a_cut_journal_or_one_of_another_generation_gives_what_it_can(tmp_path: Path) -> None:
    path = tmp_path / "index.json"
    cache = IndexCache(path)
    index = DbIndex([entry(9, 1, 1), entry(0, 2, 3)])
    save(cache, index)
    index.add(entry(0, 4, 5))
    index.add(entry(0, 6, 7))
    save(cache, index)
    text = cache.journal.read_text()
    cache.journal.write_text(text[:-5])  # the last line cut short by a crash
    loaded = DbIndex.load(path)
    assert loaded is not None and loaded.max_txid == 5  # the whole lines, then the reconcile's job
    _, *rest = text.splitlines()
    cache.journal.write_text("\n".join([json.dumps({"generation": "another"}), *rest]) + "\n")
    loaded = DbIndex.load(path)
    assert loaded is not None and loaded.max_txid == 3  # not this index.json's journal: ignored
    path.write_text("{not json")
    assert DbIndex.load(path) is None  # damaged: rebuilt from the store


def test_version_1_caches_are_still_read(tmp_path: Path) -> None:
    e = entry(9, 1, 4)
    path = tmp_path / "index.json"
    fields = ["level", "min_txid", "max_txid", "timestamp", "size", "commit", "page_size", "pre", "post"]
    path.write_text(json.dumps({"version": 1, "files": [dict(zip(fields, (9, 1, 4, 0, 100, 10, 4096, 0, 4),
                                                                 strict=True))]}))
    loaded = DbIndex.load(path)
    assert loaded is not None and list(loaded) == [e]


async def test_every_changed_index_is_saved_in_one_go_and_one_that_fails_stays_changed(tmp_path: Path) -> None:
    """`save_dirty` writes each changed database's index and page checksums; a database whose state directory cannot
    be written is reported, stays to be written the next time, and holds back none of the others."""
    import shutil

    from structlog.testing import capture_logs

    from sidecar.engine import DbIndex as Index
    from sidecar.engine import Engine, Levels
    from sidecar.engine.pagesums import PageSums
    from sidecar.storage import open_storage
    from tests.engine.history import History

    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                               Levels(l0_interval=3600))
    histories = {name: History(tmp_path / f"{name}.live") for name in ("a.db", "b.db", "c.db")}
    try:
        for name, history in histories.items():
            for _ in range(3):
                history.write()
                await engine.write_tx("c", name, history.commit(1_790_000_000_000))
            await engine.flush("c", name)
        dbs = {name: engine.catalog.require("c", name) for name in histories}
        blocked = dbs["b.db"].dir
        shutil.rmtree(blocked, ignore_errors=True)
        blocked.parent.mkdir(parents=True, exist_ok=True)
        blocked.write_text("not a directory")  # every write under it fails
        with capture_logs() as logs:
            await engine.catalog.save_dirty()
        for name in ("a.db", "c.db"):
            db = dbs[name]
            assert list(Index.load(db.dir / "index.json") or []) == list(db.index)
            sums = PageSums.load(db.dir)
            assert sums is not None and db.sums is not None and sums.dump() == db.sums.dump()
        assert [(e["db"], e["log_level"]) for e in logs if e["event"] == "index cache not written; tried again later"] \
            == [("b.db", "warning")]
        blocked.unlink()  # the disk is writable again: the next save writes what the failed one did not
        await engine.catalog.save_dirty()
        assert list(Index.load(blocked / "index.json") or []) == list(dbs["b.db"].index)
        assert PageSums.load(blocked) is not None
    finally:
        for history in histories.values():
            history.close()
        await engine.close()


async def test_a_save_under_way_is_not_waited_for_and_its_database_is_saved_the_next_time(tmp_path: Path) -> None:
    import asyncio

    from sidecar.engine import DbIndex as Index
    from sidecar.engine import Engine, Levels
    from sidecar.storage import open_storage
    from tests.engine.history import History

    engine = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                               Levels(l0_interval=3600))
    history = History(tmp_path / "live")
    try:
        history.write()
        await engine.write_tx("c", "app.db", history.commit(1_790_000_000_000))
        await engine.flush("c", "app.db")
        db = engine.catalog.require("c", "app.db")
        async with db.saving:  # a compaction's save, say
            await asyncio.wait_for(engine.catalog.save_dirty(), 5)  # does not wait for it
            assert Index.load(db.dir / "index.json") is None
        await engine.catalog.save_dirty()
        assert list(Index.load(db.dir / "index.json") or []) == list(db.index)
    finally:
        history.close()
        await engine.close()


def test_page_checksums_are_written_over_themselves_and_a_torn_write_is_not_trusted(tmp_path: Path) -> None:
    """`pages.bin` is rewritten in place (the same file, no new one per save), longer or shorter; a write torn by a
    crash (the new table's first bytes over the old one's rest) loads as a table that does not match the position
    it claims, so the engine rebuilds it from the store instead of trusting it."""
    old = PageSums(4096, array.array("Q", [0x1111 * (i + 1) for i in range(64)]), txid=5)
    new = PageSums(4096, array.array("Q", [0x2222 * (i + 1) for i in range(64)]), txid=6)
    PageSums.save(tmp_path, old.dump())
    inode = (tmp_path / FILE).stat().st_ino
    PageSums.save(tmp_path, new.dump())
    assert (tmp_path / FILE).stat().st_ino == inode
    loaded = PageSums.load(tmp_path)
    assert loaded is not None and loaded.matches(Pos(6, new.checksum)) and loaded.dump() == new.dump()
    shorter = PageSums(4096, array.array("Q", [7, 8, 9]), txid=7)
    PageSums.save(tmp_path, shorter.dump())
    again = PageSums.load(tmp_path)
    assert again is not None and again.dump() == shorter.dump()

    PageSums.save(tmp_path, old.dump())
    cut = len(new.dump()) // 2
    (tmp_path / FILE).write_bytes(new.dump()[:cut] + old.dump()[cut:])  # as a crash midway would leave it
    torn = PageSums.load(tmp_path)
    assert torn is None or not torn.matches(Pos(6, new.checksum))
