"""Upload bodies: per-transaction files merged whole in memory, or streamed when a big snapshot is among them,
give the same upload; a broken file or a gap is refused naming it."""

from __future__ import annotations

import io
import os
import tracemalloc
from pathlib import Path

import pytest

from sidecar.daemon import build
from sidecar.daemon.build import compact_files
from sidecar.ltx import FLAG_COMPRESS_LZ4, CompactionError, Header, LTXError, Version
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import Encoder
from tests.ltx.chain import build_chain

F = 1 << 63  # the checksum flag

PAGE = 4096


def write(tmp: Path, files: list[bytes]) -> list[Path]:
    paths = []
    for i, data in enumerate(files):
        path = tmp / f"{i + 1:016x}-{i + 1:016x}.ltx"
        path.write_bytes(data)
        paths.append(path)
    return paths


class TestCompactFiles:
    @pytest.mark.parametrize("lz4", [False, True])
    def test_a_big_snapshot_is_streamed_and_small_files_merged_in_memory(self, tmp_path: Path, lz4: bool) -> None:
        """1,200 raw pages of 4 KiB (over the 4 MiB at which a file is mapped, not read) then small files."""
        txs = [(1200, {p: 1 for p in range(1, 1201)}), (1200, {3: 2, 900: 2}), (1100, {4: 3}), (1300, {1250: 4})]
        files, db = build_chain(txs, lz4=False, size=PAGE)
        paths = write(tmp_path, files)
        assert paths[0].stat().st_size > 4 << 20
        body, header, post = compact_files(paths, compress=lz4)
        small_body, _, _ = compact_files(paths[1:], compress=lz4)  # every input in memory
        _, pages, trailer = decode(body, Version.V2)
        assert (header.min_txid, header.max_txid, header.commit) == (1, 4, 1300)
        assert dict(pages) == db and trailer.post_apply_checksum == post
        # The in-memory merge of the later files is what the streaming merge laid over the snapshot.
        _, small_pages, _ = decode(small_body, Version.V2)
        written = {p for data in files[1:] for p, _ in decode(data, Version.V2)[1]}
        assert [p for p, _ in small_pages] == sorted(written) and dict(small_pages) == {p: db[p] for p in written}

    def test_a_broken_file_is_named(self, tmp_path: Path) -> None:
        files, _ = build_chain([(4, {p: 1 for p in range(1, 5)}), (4, {2: 2}), (4, {3: 3})], lz4=True, size=PAGE)
        paths = write(tmp_path, files)
        data = bytearray(paths[1].read_bytes())
        data[-1] ^= 1  # the file checksum
        paths[1].write_bytes(bytes(data))
        with pytest.raises(LTXError, match=rf"{paths[1]}: file checksum mismatch"):
            compact_files(paths)

    def test_a_gap_is_refused(self, tmp_path: Path) -> None:
        files, _ = build_chain([(4, {p: 1 for p in range(1, 5)}), (4, {2: 2}), (4, {3: 3})], lz4=True, size=PAGE)
        paths = write(tmp_path, files)
        with pytest.raises(CompactionError, match="non-contiguous"):
            compact_files([paths[0], paths[2]])


def test_transactions_whose_pages_far_outgrow_their_files_are_merged_streaming(tmp_path: Path) -> None:
    """Two LiteFS files of 0.2 MB each whose pages are 49 MB each (zero pages compress 255:1: a large transaction
    of a sparse table) are merged a page at a time, not decompressed whole into the sidecar's memory."""
    files = []
    for k, (pre, post) in enumerate(((F | 5, F | 7), (F | 7, F | 9))):
        out = io.BytesIO()
        header = Header(page_size=4096, commit=12_000, min_txid=2 + k, max_txid=2 + k, timestamp=0,
                        pre_apply_checksum=pre, flags=FLAG_COMPRESS_LZ4)
        enc = Encoder(out, header, Version.V2)
        for pgno in range(1, 12_001):
            enc.write_page(pgno, bytes(4096))
        enc.close(post)
        files.append(out.getvalue())
    assert all(len(f) < 1 << 20 for f in files)
    paths = write(tmp_path, files)
    tracemalloc.start()
    try:
        body, header, post = compact_files(paths)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (header.min_txid, header.max_txid, header.commit, post) == (2, 3, 12_000, F | 9)
    got = decode(body, Version.V2)
    assert len(got[1]) == 12_000 and got[2].post_apply_checksum == F | 9
    assert peak < 48 << 20, f"{peak >> 20} MiB held for 98 MB of pages"  # whole: the 98 MB and more


def test_files_are_read_one_at_a_time_and_let_go_once_merged(tmp_path: Path) -> None:
    """A second of a busy database: 400 files of 8 KiB rewriting the same two pages are never all in memory."""
    txs = [(4, {p: 1 for p in range(1, 5)})] + [(4, {2: k, 3: k}) for k in range(2, 402)]
    files, db = build_chain(txs, lz4=False, size=PAGE)
    paths = write(tmp_path, files)
    on_disk = sum(len(f) for f in files)
    tracemalloc.start()
    try:
        body, header, post = compact_files(paths, compress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    _, pages, trailer = decode(body, Version.V2)
    assert dict(pages) == db and trailer.post_apply_checksum == post and header.max_txid == 401
    assert peak < on_disk // 8, f"{peak >> 10} KiB held to compact {on_disk >> 10} KiB of files"


def test_reading_a_file_leaves_its_access_time_alone(tmp_path: Path) -> None:
    """LiteFS's files are read once: the sidecar's read must not dirty their inodes (relatime would update an
    access time older than the modification time)."""
    files, db = build_chain([(2, {1: 1, 2: 1}), (2, {2: 2})], lz4=True, size=PAGE)
    paths = write(tmp_path, files)
    for path in paths:
        os.utime(path, ns=(1_000_000_000, path.stat().st_mtime_ns))  # read long ago, changed since
    body = compact_files(paths)[0]
    assert dict(decode(body, Version.V2)[1]) == db
    assert [path.stat().st_atime_ns for path in paths] == [1_000_000_000] * len(paths)


def test_a_file_it_may_not_open_without_access_time_is_opened_plainly(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """O_NOATIME needs the file's owner: as another user (the kernel's EPERM, here injected), the plain open."""
    if not getattr(os, "O_NOATIME", 0):
        pytest.skip("no O_NOATIME on this platform")  # the plain open is the only path there
    files, db = build_chain([(2, {1: 1, 2: 1})], lz4=True, size=PAGE)
    paths = write(tmp_path, files)
    real_open, flags_seen = os.open, []

    def not_the_owner(path: str, flags: int, *args: int) -> int:
        flags_seen.append(flags)
        if flags & os.O_NOATIME:
            raise PermissionError(1, "Operation not permitted", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(build, "_noatime", os.O_NOATIME)
    monkeypatch.setattr(build.os, "open", not_the_owner)
    assert dict(decode(compact_files(paths)[0], Version.V2)[1]) == db
    assert dict(decode(compact_files(paths)[0], Version.V2)[1]) == db
    assert [bool(f & os.O_NOATIME) for f in flags_seen] == [True, False, False]  # asked once, then not again
