"""Restore's merge: the newest file holding a page wins, pages beyond the last commit go, the lock page reads
as zeros, every file checksum is verified, and the result is the same however the pages are cut into ranges."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sidecar.engine import merge as merge_module
from sidecar.engine import plan_restore, restore, scan
from sidecar.engine.merge import Merged, WindowWriter
from sidecar.errors import RestoreError
from sidecar.ltx import FLAG_NO_CHECKSUM, Header, Version, lock_pgno
from sidecar.ltx.checksum import database_checksum
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.types import CHECKSUM_FLAG
from sidecar.storage import open_storage
from sidecar.storage.layout import FILE_LAYOUT


class Chain:
    """Stored v3 files as the engine writes them (no-checksum flag, database checksums in the extension),
    and the database they should restore to."""

    def __init__(self, root: Path, page_size: int = 512, seed: int = 1) -> None:
        self.root = root
        self.page_size = page_size
        self.rng = random.Random(seed)
        self.db: dict[int, bytes] = {}
        self.commit = 0
        self.txid = 0
        self.post = 0

    def page(self, pgno: int) -> bytes:
        return pgno.to_bytes(4, "big") + self.rng.randbytes(self.page_size // 4) + bytes(self.page_size * 3 // 4 - 4)

    def add(self, pgnos: list[int], commit: int, level: int = 0, blank: bool = False) -> Path:
        """One file writing `pgnos` (fresh contents; zeros if `blank`) and setting the size to `commit`."""
        zeros = bytes(self.page_size)  # one object for every blank page
        pages = {p: zeros if blank else self.page(p) for p in sorted(pgnos)}
        self.db.update(pages)
        self.db = {p: d for p, d in self.db.items() if p <= commit}
        self.commit = commit
        lo = self.txid + 1 if self.txid else 1
        self.txid += 1
        pre, self.post = self.post, database_checksum(sorted(self.db.items()), self.page_size)
        header = Header(page_size=self.page_size, commit=commit, min_txid=lo, max_txid=self.txid,
                        timestamp=1_700_000_000_000 + self.txid, flags=FLAG_NO_CHECKSUM,
                        ext_pre_apply_checksum=pre if lo > 1 else 0, ext_post_apply_checksum=self.post)
        path = self.root / FILE_LAYOUT.ltx_key("", level, lo, self.txid)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            enc = Encoder(f, header, Version.V3)
            for p, data in pages.items():
                enc.write_page(p, data)
            enc.close(0)
        return path

    def snapshot(self, commit: int) -> Path:
        lock = lock_pgno(self.page_size)
        return self.add([p for p in range(1, commit + 1) if p != lock], commit, level=9)

    def expected(self) -> bytes:
        blank = bytes(self.page_size)
        return b"".join(self.db.get(p, blank) for p in range(1, self.commit + 1))


async def merge(chain: Chain, out: Path, ranges: int) -> Merged:
    """Merge the plan of the latest state, cutting the pages into `ranges` ranges (the first in this thread,
    the rest in worker processes)."""
    store = open_storage(f"file://{chain.root}")
    plan = plan_restore(await scan(store, ""))
    return merge_module.merge([chain.root / e.key(FILE_LAYOUT, "") for e in plan], out, ranges=ranges)


@pytest.fixture
def chain(tmp_path: Path) -> Chain:
    return Chain(tmp_path / "store")


class TestSplit:
    def test_ranges_are_whole_windows_and_the_last_ends_past_commit(self) -> None:
        assert merge_module._split(3000, 512, 3) == [(1, 1025), (1025, 2049), (2049, 3001)]
        assert merge_module._split(3000, 512, 8) == [(1, 1025), (1025, 2049), (2049, 3001)]
        assert merge_module._split(100, 512, 2) == [(1, 101)]
        assert merge_module._split(0, 4096, 2) == [(1, 1)]


class TestMerge:
    @pytest.mark.parametrize("ranges", [1, 2, 3])
    async def test_later_files_override_the_snapshot(self, chain: Chain, tmp_path: Path, ranges: int) -> None:
        chain.snapshot(3000)  # six 1,024-page windows of 512-byte pages
        rng = random.Random(2)
        for i in range(6):
            chain.add(rng.sample(range(1, 3001), 200), 3000, level=1 if i % 2 else 0)
        chain.add([1, 1024, 1025, 2048, 2049, 3000], 3000)  # both sides of every window edge
        result = await merge(chain, tmp_path / "out.db", ranges)
        assert (tmp_path / "out.db").read_bytes() == chain.expected()
        assert (result.checksum, result.pages, result.page_size) == (chain.post, 3000, 512)

    @pytest.mark.parametrize("ranges", [1, 3])
    async def test_a_shrinking_commit_drops_the_pages_beyond_it(self, chain: Chain, tmp_path: Path,
                                                                ranges: int) -> None:
        chain.snapshot(3000)
        chain.add([5, 2500, 2999], 3000)
        chain.add([7, 1500], 1800)  # the database shrinks: pages 1801..3000 are gone
        chain.add([1700], 1800)
        result = await merge(chain, tmp_path / "out.db", ranges)
        assert (tmp_path / "out.db").read_bytes() == chain.expected()
        assert len(chain.expected()) == 1800 * 512
        assert result.checksum == chain.post and result.pages == 1800

    async def test_a_database_shrunk_to_nothing(self, chain: Chain, tmp_path: Path) -> None:
        chain.snapshot(40)
        chain.add([], 0)
        result = await merge(chain, tmp_path / "out.db", 1)
        assert (tmp_path / "out.db").read_bytes() == b""
        assert result.checksum == CHECKSUM_FLAG and result.pages == 0

    async def test_the_lock_page_reads_as_zeros(self, tmp_path: Path) -> None:
        """A database past 1 GiB (64 KiB pages, so 16,386 of them) skips the lock page in every file."""
        chain = Chain(tmp_path / "store", page_size=65536)
        lock = lock_pgno(65536)
        chain.add([p for p in range(1, lock + 2) if p != lock], lock + 1, level=9, blank=True)
        chain.add([1, lock - 1, lock + 1], lock + 1)
        out = tmp_path / "out.db"
        result = await merge(chain, out, 2)
        assert result.checksum == chain.post and result.pages == lock
        with open(out, "rb") as f:
            assert f.seek(0, 2) == (lock + 1) * 65536
            for p in (1, lock - 1, lock, lock + 1):
                f.seek((p - 1) * 65536)
                assert f.read(65536) == chain.db.get(p, bytes(65536)), p


class TestRestore:
    async def test_a_large_restore_runs_in_worker_processes(self, chain: Chain, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(merge_module, "_PARALLEL_MIN_BYTES", 0)  # every restore counts as large
        chain.snapshot(3000)
        chain.add(list(range(1, 3001, 7)), 3000)
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        result = await restore(store, "", plan, tmp_path / "out.db")
        assert (tmp_path / "out.db").read_bytes() == chain.expected()
        assert result.verified and result.checksum == chain.post

    @pytest.mark.parametrize("ranges", [1, 3])
    async def test_a_corrupt_page_fails_the_restore_naming_the_file(self, chain: Chain, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    ranges: int) -> None:
        monkeypatch.setattr(merge_module, "_PARALLEL_MIN_BYTES", 0 if ranges > 1 else 1 << 62)
        monkeypatch.setattr(merge_module, "_cores", lambda: ranges)
        chain.snapshot(3000)
        bad = chain.add(list(range(2900, 3001)), 3000)  # pages in the last range
        data = bytearray(bad.read_bytes())
        data[len(data) // 2] ^= 0x01  # inside a compressed block: the page or the checksum goes wrong
        bad.write_bytes(bytes(data))
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        with pytest.raises(RestoreError, match=rf"corrupt backup file: {bad.relative_to(chain.root).as_posix()}: "):
            await restore(store, "", plan, tmp_path / "out.db")
        assert not (tmp_path / "out.db").exists()
        assert not list(tmp_path.glob(".out.db*"))

    async def test_a_changed_index_fails_the_file_checksum(self, chain: Chain, tmp_path: Path) -> None:
        chain.snapshot(100)
        bad = chain.add([3, 4, 50], 100)
        data = bytearray(bad.read_bytes())
        data[-26] ^= 0x01  # the last byte of the page index's last entry (before the terminator and size)
        bad.write_bytes(bytes(data))
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        key = bad.relative_to(chain.root).as_posix()
        with pytest.raises(RestoreError, match=rf"corrupt backup file: {key}: file checksum mismatch"):
            await restore(store, "", plan, tmp_path / "out.db")
        assert not (tmp_path / "out.db").exists()

    @pytest.mark.parametrize("flip", [0x01, 0x80])
    async def test_a_flipped_commit_blames_the_file_not_the_plan(self, chain: Chain, tmp_path: Path,
                                                                   flip: int) -> None:
        """A bit flipped in the newest file's commit (the database's size) is that file's corruption, named as
        such; not "the plan is missing a page", and no output file of terabytes is made to find out."""
        chain.snapshot(100)
        bad = chain.add([3, 4], 100)
        data = bytearray(bad.read_bytes())
        data[12] ^= flip  # the commit's top byte: 2**24 or 2**31 pages more
        bad.write_bytes(bytes(data))
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        key = bad.relative_to(chain.root).as_posix()
        out = tmp_path / "out.db"
        with pytest.raises(RestoreError, match=rf"corrupt backup file: {key}: file checksum mismatch"):
            merge_module.merge([chain.root / e.key(FILE_LAYOUT, "") for e in plan], out, names=[
                e.key(FILE_LAYOUT, "") for e in plan])
        assert out.stat().st_size <= 100 * 512

    async def test_a_plan_without_every_page_is_refused(self, chain: Chain, tmp_path: Path) -> None:
        chain.snapshot(100)
        chain.add([3, 4], 100)
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        with pytest.raises(RestoreError, match=r"missing page 1 \(commit is 100\)"):
            await restore(store, "", plan[1:], tmp_path / "out.db")
        assert not (tmp_path / "out.db").exists()


class TestWindowWriter:
    @pytest.mark.parametrize("direct", [True, False])
    def test_windows_land_at_their_offsets_whatever_their_alignment(self, tmp_path: Path, direct: bool) -> None:
        """Whole 4 KiB blocks go around the page cache where the file system allows it, the rest through it;
        the file reads back the same either way."""
        path = tmp_path / "out.db"
        path.write_bytes(bytes(3 * 8192 + 1536))
        rng = random.Random(3)
        expected = bytearray(path.read_bytes())
        with WindowWriter(str(path), 8192, direct=direct) as writer:
            for offset, size in ((0, 8192), (8192, 8192), (16384, 8192), (24576, 1536)):
                win = writer.buffer()
                data = rng.randbytes(size)
                win[:size] = data
                expected[offset:offset + size] = data
                writer.write(win[:size], offset)
        assert path.read_bytes() == bytes(expected)


class TestProgress:
    @pytest.mark.parametrize("parallel", [False, True])
    async def test_progress_counts_up_to_the_stored_bytes(self, chain: Chain, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch, parallel: bool) -> None:
        if parallel:
            monkeypatch.setattr(merge_module, "_PARALLEL_MIN_BYTES", 0)
        chain.snapshot(5000)  # five windows of 512-byte pages
        chain.add(list(range(1, 5001, 3)), 5000)
        store = open_storage(f"file://{chain.root}")
        plan = plan_restore(await scan(store, ""))
        seen: list[tuple[int, int]] = []
        await restore(store, "", plan, tmp_path / "out.db", progress=lambda done, total: seen.append((done, total)))
        total = sum(e.size for e in plan)
        assert len(seen) >= 3 and {t for _, t in seen} == {total}
        assert [d for d, _ in seen] == sorted(d for d, _ in seen) and seen[-1] == (total, total)
