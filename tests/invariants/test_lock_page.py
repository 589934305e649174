"""SQLite's lock page (the page holding byte offset 1 GiB) never counts in an LTX database checksum.

One sparse database just past 1 GiB with 64 KiB pages, whose lock page holds junk, goes through every function
of sidecar that computes a database checksum; each must agree with a test-local implementation of the reference
rule (spec/ltx.md §4): FLAG | XOR over pages p ≠ lock of CRC-64/ISO(be32(p) ‖ page).
"""

from __future__ import annotations

import io
import mmap
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastcrc import crc64

from sidecar.daemon.build import encode_state, import_checksums
from sidecar.engine import Levels
from sidecar.ltx import Header, Pos, Version
from sidecar.ltx.checksum import checksum_database_file, database_checksum
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.sqlite import Applier, database_checksum_of, encode_db
from tests.conftest import GO_V2, load_json
from tests.invariants.conftest import OpenEngine

PAGE = 65536
LOCK = (1 << 30) // PAGE + 1  # 16385: SQLite's PENDING_BYTE page, computed here from its definition
COMMIT = LOCK + 1  # the database ends one page past the lock page
FLAG = 1 << 63


# -- the reference rule, written here from the spec and nothing of sidecar --------------------------------------

ISO_POLY = 0xD800000000000000  # reversed x^64 + x^4 + x^3 + x + 1
_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ ISO_POLY if _c & 1 else _c >> 1
    _TABLE.append(_c)


def crc64_iso_slow(data: bytes) -> int:
    """CRC-64/ISO as Go's hash/crc64 computes it, a byte at a time (for checking the fast one on small inputs)."""
    c = 0xFFFFFFFFFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFFFFFFFFFF


def reference_pages(path: Path, page_size: int, commit: int | None = None,
                    writes: dict[int, bytes] | None = None) -> Iterator[tuple[int, bytes]]:
    """Pages 1..commit of the file at `path` (zeros past its end), with `writes` replacing some."""
    writes = writes or {}
    with open(path, "rb") as f:
        size = f.seek(0, io.SEEK_END)
        f.seek(0)
        for pgno in range(1, (commit if commit is not None else size // page_size) + 1):
            page = f.read(page_size) or bytes(page_size)
            yield pgno, writes.get(pgno, page)


def reference_checksum(pages: Iterator[tuple[int, bytes]], page_size: int) -> int:
    lock = (1 << 30) // page_size + 1
    value = 0
    for pgno, page in pages:
        if pgno != lock:
            value ^= crc64.go_iso(pgno.to_bytes(4, "big") + page)
    return FLAG | value


def reference_of(path: Path, commit: int | None = None, writes: dict[int, bytes] | None = None,
                 page_size: int = PAGE) -> int:
    return reference_checksum(reference_pages(path, page_size, commit, writes), page_size)


class TestReferenceRule:
    """The test's own rule agrees with Go's ltx, so the tests below compare sidecar with the reference."""

    def test_crc_is_go_crc64_iso(self) -> None:
        """The CRC is Go's crc64 with the ISO table (check value of "123456789")."""
        assert crc64_iso_slow(b"123456789") == crc64.go_iso(b"123456789") == 0xB90956C775A41001
        data = bytes(range(256)) * 3
        assert crc64_iso_slow(data) == crc64.go_iso(data)

    @pytest.mark.parametrize("case", sorted(load_json(GO_V2 / "expected.json")["cases"]))
    def test_matches_go_ltx_on_its_fixtures(self, case: str) -> None:
        """`ltx checksum` of the Go fixtures (all under 1 GiB) equals the reference rule."""
        want = load_json(GO_V2 / "expected.json")["cases"][case]
        assert f"{reference_of(GO_V2 / f'{case}.db', page_size=want['page_size']):016x}" == want["db_checksum"]


# -- the database past 1 GiB ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real SQLite database (64 KiB pages) extended, sparsely, to one page past the lock page."""
    path = tmp_path_factory.mktemp("lock-page") / "big.db"
    con = sqlite3.connect(path)
    con.execute(f"PRAGMA page_size={PAGE}")
    con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, v TEXT)")
    con.executemany("INSERT INTO t (v) VALUES (?)", [(f"row {i} " * 40,) for i in range(500)])
    con.commit()
    con.close()
    with open(path, "r+b") as f:
        f.truncate(COMMIT * PAGE)
        f.seek(28)
        f.write(COMMIT.to_bytes(4, "big"))  # the header's page count, which LiteFS's import reads
        for pgno, fill in ((LOCK - 1, b"before the lock page "), (LOCK, b"junk in the lock page "),
                           (COMMIT, b"after the lock page ")):
            f.seek((pgno - 1) * PAGE)
            f.write((fill * PAGE)[:PAGE])
    return path


@pytest.fixture(scope="module")
def want(big_db: Path) -> int:
    """The reference checksum of the big database."""
    return reference_of(big_db)


@pytest.fixture(scope="module")
def snapshot(big_db: Path) -> bytes:
    """The big database as an LTX v2 snapshot (LZ4: the sparse pages compress to almost nothing)."""
    out = io.BytesIO()
    with open(big_db, "rb") as db:
        encode_db(db, out, version=Version.V2, compress=True, txid=7, timestamp=7000)
    return out.getvalue()


def test_the_lock_page_matters_to_the_reference(big_db: Path, want: int) -> None:
    """The fixture is sharp: counting the lock page would give another checksum."""
    counted = FLAG
    for pgno, page in reference_pages(big_db, PAGE):
        counted ^= crc64.go_iso(pgno.to_bytes(4, "big") + page)
    assert counted | FLAG != want
    assert big_db.stat().st_size == COMMIT * PAGE > 1 << 30


class TestEveryChecksumSkipsTheLockPage:
    """Each function of sidecar that computes a database checksum, on the database past 1 GiB."""

    def test_database_checksum(self, big_db: Path, want: int) -> None:
        """ltx.checksum.database_checksum over (pgno, page) pairs that include the lock page."""
        with open(big_db, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            view = memoryview(mm)
            try:
                pages = ((p, view[(p - 1) * PAGE:p * PAGE]) for p in range(1, COMMIT + 1))
                assert database_checksum(pages, PAGE) == want
                assert checksum_database_file(view, PAGE) == want
            finally:
                view.release()

    def test_database_checksum_of(self, big_db: Path, want: int) -> None:
        """ltx.sqlite.database_checksum_of, with the page size given and read from the header."""
        with open(big_db, "rb") as f:
            assert database_checksum_of(f, PAGE) == (want, COMMIT)
            assert database_checksum_of(f) == (want, COMMIT)

    def test_encode_db_and_the_decoder(self, snapshot: bytes, want: int) -> None:
        """encode_db's post-apply checksum, which the decoder recomputes from the pages and checks."""
        dec = Decoder(snapshot, Version.V2)
        pgnos = [pgno for pgno, _ in dec.pages()]
        assert dec.close().post_apply_checksum == want
        assert dec.header.commit == COMMIT and pgnos == [*range(1, LOCK), COMMIT]

    def test_applier_across_the_lock_page(self, tmp_path: Path, big_db: Path, snapshot: bytes, want: int) -> None:
        """Applier: a snapshot onto nothing, a shrink below the lock page, a growth past it again."""
        shrink = (LOCK - 1, {LOCK - 1: b"s" * PAGE})
        grow = (COMMIT, {COMMIT: b"g" * PAGE})  # the lock page and nothing else left unwritten: zeros
        with open(tmp_path / "db", "w+b") as db:
            applier = Applier(db)
            assert applier.apply(snapshot, Version.V2) == Pos(7, want)
            writes: dict[int, bytes] = {}
            for txid, (commit, pages) in enumerate((shrink, grow), 8):
                writes.update(pages)
                post = reference_of(big_db, commit, writes)
                upload = _increment(txid, commit, applier.pos.post_apply_checksum, pages, post)
                assert applier.apply(upload, Version.V2) == Pos(txid, post)  # ChecksumMismatch if it disagrees
            assert applier.pos.post_apply_checksum == reference_of(tmp_path / "db")

    def test_encode_onto_a_position(self, big_db: Path, want: int) -> None:
        """ltx.sqlite.encode_db(onto=…): the whole database as the next transaction on top of a position (what the
        engine appends for an operator restore, and the sidecar ships for an import)."""
        out = io.BytesIO()
        with open(big_db, "rb") as src:
            header, trailer = encode_db(src, out, version=Version.V2, onto=Pos(3, FLAG | 12345), timestamp=9000)
        assert (header.min_txid, header.pre_apply_checksum) == (4, FLAG | 12345)
        assert trailer.post_apply_checksum == want

    def test_daemon_build(self, big_db: Path, want: int) -> None:
        """daemon.build.encode_state and import_checksums (the checksums LiteFS may record for an import)."""
        data = big_db.read_bytes()
        _, post = encode_state(data, onto=Pos(3, FLAG | 12345), max_txid=4, timestamp=9000)
        assert post == want
        assert want in import_checksums(data)

    async def test_engine_restore(self, tmp_path: Path, snapshot: bytes, want: int,
                                  open_engine: OpenEngine) -> None:
        """The engine stores the snapshot and restores it; the restore's own checksum is verified and right."""
        engine = await open_engine("a", Levels(l0_interval=0))
        await engine.write_tx("c", "big.db", snapshot)
        assert engine.pos("c", "big.db") == Pos(7, want)
        result = await engine.restore_to("c", "big.db", tmp_path / "restored.db")
        assert (result.checksum, result.verified) == (want, True)
        assert reference_of(tmp_path / "restored.db") == want


def _increment(txid: int, commit: int, pre: int, pages: dict[int, bytes], post: int) -> bytes:
    out = io.BytesIO()
    enc = Encoder(out, Header(page_size=PAGE, commit=commit, min_txid=txid, max_txid=txid, timestamp=txid * 1000,
                              pre_apply_checksum=pre), Version.V2)
    for pgno in sorted(pages):
        enc.write_page(pgno, pages[pgno])
    enc.close(post)
    return out.getvalue()
