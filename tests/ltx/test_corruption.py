"""Every single-byte flip and every truncation of real files is refused with the codec's error, never more."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import sidecar.ltx.sqlite as sqlite_mod
from sidecar.ltx import HEADER_SIZE, ChecksumMismatch, Header, LTXError, Version, lock_pgno
from sidecar.ltx.checksum import crc, database_checksum
from sidecar.ltx.decoder import Decoder, decode, verify
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.sqlite import Applier
from tests.conftest import GO_V2, LITEFS, LITESTREAM
from tests.ltx.chain import PAGE, build_chain, checksum, page

L0 = LITESTREAM / "replica" / "ltx" / "0"
CASES = [
    (LITEFS / "per-tx" / "fx-wal.db" / "0000000000000001-0000000000000001.ltx", Version.V2),  # v2, LZ4 frame
    (LITEFS / "per-tx" / "fx-nocomp.db" / "0000000000000009-0000000000000009.ltx", Version.V2),  # v2, raw
    (GO_V2 / "tiny-512.lz4.ltx", Version.V2),  # v2 snapshot, LZ4
    (min(L0.glob("*.ltx"), key=lambda p: p.stat().st_size), Version.V3),  # v3, page index
]


def refused(data: bytes, version: Version) -> bool:
    """True if the codec raises LTXError for `data`, from a buffer and from a stream alike."""
    outcomes = []
    for src in (data, io.BytesIO(data)):
        try:
            verify(src, version)
            outcomes.append(False)
        except LTXError:
            outcomes.append(True)
    assert outcomes[0] == outcomes[1]
    return outcomes[0]


@pytest.mark.parametrize(("path", "version"), CASES, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_every_byte_flip_is_refused(path: Path, version: Version) -> None:
    """Refused, or, inside LZ4 data (which the format does not hash), decoding to the very same content.

    An LZ4 match offset that points at identical bytes (runs of zeros) still decodes to the same page;
    the reference decoder accepts those too, since the file checksum covers decompressed pages (spec §3).
    """
    data = path.read_bytes()
    assert not refused(data, version)
    original = decode(data, version)
    harmless = 0
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            if not refused(bytes(bad), version):
                assert decode(bytes(bad), version) == original, (i, mask)
                assert i >= HEADER_SIZE, (i, mask)
                harmless += 1
    assert harmless <= len(data) // 20 + 8


@pytest.mark.parametrize(("path", "version"), CASES, ids=lambda v: v.name if isinstance(v, Path) else str(v))
def test_every_truncation_is_refused(path: Path, version: Version) -> None:
    data = path.read_bytes()
    for n in range(len(data)):
        assert refused(data[:n], version), n
    assert refused(data + b"\x00", version)


def test_huge_claims_do_not_allocate() -> None:
    """A header claiming a 4-billion-page commit and 64 KiB pages decodes lazily and fails on truncation."""
    data = bytearray((LITEFS / "per-tx" / "fx-nocomp.db" / "0000000000000009-0000000000000009.ltx").read_bytes())
    data[12:16] = (2**32 - 1).to_bytes(4, "big")  # commit
    with pytest.raises(LTXError):
        verify(bytes(data[:200]), Version.V2)
    data = bytearray(next(L0.glob("*.ltx")).read_bytes())
    data[-16 - 8:-16] = (2**63).to_bytes(8, "big")  # page index size
    with pytest.raises(LTXError):
        verify(bytes(data), Version.V3)


def test_errors_name_field_or_offset() -> None:
    data = bytearray((LITEFS / "per-tx" / "fx-nocomp.db" / "0000000000000009-0000000000000009.ltx").read_bytes())
    data[8:12] = (1000).to_bytes(4, "big")
    with pytest.raises(LTXError, match="page size") as err:
        Decoder(bytes(data), Version.V2)
    assert err.value.field == "page_size"
    data = (LITEFS / "per-tx" / "fx-nocomp.db" / "0000000000000009-0000000000000009.ltx").read_bytes()
    with pytest.raises(LTXError, match="at byte") as err2:
        verify(data[:-5], Version.V2)
    assert err2.value.offset is not None


def _grow_file(db: dict[int, bytes], commit: int, writes: dict[int, bytes], post: int, size: int) -> bytes:
    """A v2 file at TXID 2 on top of `db` (at TXID 1): `writes`, and the database grown to `commit` pages."""
    out = io.BytesIO()
    enc = Encoder(out, Header(page_size=size, commit=commit, min_txid=2, max_txid=2, timestamp=1,
                              pre_apply_checksum=checksum(db, size)), Version.V2)
    for pgno, data in sorted(writes.items()):
        enc.write_page(pgno, data)
    enc.close(post)
    return out.getvalue()


class TestApplierGrowth:
    def test_huge_commit_is_not_walked_page_by_page(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A checksummed file claiming 2**32 - 2 pages (the rest zeros) with a wrong post-apply checksum is refused
        by that checksum without summing four billion zero pages first (hours of CRCs, the process stuck)."""
        files, db = build_chain([(2, {1: 1, 2: 2})])
        data = _grow_file(db, 2**32 - 2, {1: page(3, 1)}, checksum(db), PAGE)
        calls = 0

        def counted(*args: object) -> int:
            nonlocal calls
            calls += 1
            assert calls < 10_000, "the applier checksums the new pages one by one"
            return crc(*args)  # type: ignore[arg-type]

        with open(tmp_path / "db", "w+b") as f:
            applier = Applier(f)
            applier.apply(files[0], Version.V2)
            monkeypatch.setattr(sqlite_mod, "crc", counted)
            with pytest.raises(ChecksumMismatch, match="post-apply checksum mismatch"):
                applier.apply(data, Version.V2)

    def test_growth_past_the_lock_page_counts_zero_pages(self, tmp_path: Path) -> None:
        """Grown pages left unwritten count as zero pages, the lock page never, whatever pages the file writes."""
        size = 65536
        lock = lock_pgno(size)
        files, db = build_chain([(2, {1: 1, 2: 2})], size=size)
        commit = lock + 4
        writes = {lock - 1: page(5, lock - 1, size), lock + 2: page(6, lock + 2, size)}
        after = {**{p: bytes(size) for p in range(1, commit + 1)}, **db, **writes}
        del after[lock]
        data = _grow_file(db, commit, writes, database_checksum(sorted(after.items()), size), size)
        with open(tmp_path / "db", "w+b") as f:
            applier = Applier(f)
            applier.apply(files[0], Version.V2)
            assert applier.apply(data, Version.V2).txid == 2
