"""The codec against files written by the reference tools (Go ltx, LiteFS 0.5.14, Litestream 0.5.17)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from sidecar.ltx import FLAG_COMPRESS_LZ4, FLAG_NO_CHECKSUM, Version, parse_filename
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import Decoder, decode, verify
from sidecar.ltx.encoder import encode
from sidecar.ltx.sqlite import apply_files, database_checksum_of, encode_db
from tests.conftest import GO_V2, LITEFS, LITESTREAM, load_json

GO_CASES = sorted(load_json(GO_V2 / "expected.json")["cases"])
MANIFEST = {e["file"]: e for e in load_json(LITEFS / "manifest.json")["ltx"]}
LITEFS_DBS = ["fx-wal.db", "fx-nocomp.db"]


def per_tx(db: str) -> list[Path]:
    return sorted((LITEFS / "per-tx" / db).glob("*.ltx"))


def uploads(db: str) -> list[Path]:
    return sorted(p for p in (LITEFS / "uploads").glob("*.ltx") if p.name.split("-", 1)[1].startswith(db + "-"))


@pytest.mark.parametrize("name", GO_CASES)
@pytest.mark.parametrize("suffix", [".ltx", ".lz4.ltx"])
def test_go_snapshot_decodes_to_database(name: str, suffix: str) -> None:
    case = load_json(GO_V2 / "expected.json")["cases"][name]
    data = (GO_V2 / f"{name}{suffix}").read_bytes()
    header, pages, trailer = decode(data, Version.V2)
    assert header.page_size == case["page_size"]
    assert header.commit == case["pages"]
    assert bool(header.flags & FLAG_COMPRESS_LZ4) == (suffix == ".lz4.ltx")
    assert f"{trailer.post_apply_checksum:016x}" == case["db_checksum"]
    db = bytearray(header.commit * header.page_size)
    for pgno, page in pages:
        db[(pgno - 1) * header.page_size:pgno * header.page_size] = page
    assert bytes(db) == (GO_V2 / f"{name}.db").read_bytes()


@pytest.mark.parametrize("name", GO_CASES)
def test_go_database_checksum(name: str) -> None:
    case = load_json(GO_V2 / "expected.json")["cases"][name]
    with open(GO_V2 / f"{name}.db", "rb") as f:
        checksum, _pages = database_checksum_of(f)
    assert f"{checksum:016x}" == case["db_checksum"]


@pytest.mark.parametrize("name", GO_CASES)
def test_go_uncompressed_snapshot_reencodes_identically(name: str) -> None:
    data = (GO_V2 / f"{name}.ltx").read_bytes()
    header, pages, trailer = decode(data, Version.V2)
    assert encode(header, pages, Version.V2, trailer.post_apply_checksum) == data
    # So does a fresh encode-db of the database with the same header fields.
    out = io.BytesIO()
    with open(GO_V2 / f"{name}.db", "rb") as f:
        encode_db(f, out, timestamp=header.timestamp, node_id=header.node_id)
    assert out.getvalue() == data


@pytest.mark.parametrize("name", GO_CASES)
def test_go_lz4_snapshot_reencodes_to_same_fields(name: str) -> None:
    data = (GO_V2 / f"{name}.lz4.ltx").read_bytes()
    header, pages, trailer = decode(data, Version.V2)
    again = encode(header, pages, Version.V2, trailer.post_apply_checksum)
    h2, p2, t2 = decode(again, Version.V2)
    assert (h2, p2, t2.post_apply_checksum) == (header, pages, trailer.post_apply_checksum)


@pytest.mark.parametrize("entry", sorted(MANIFEST), ids=lambda s: s.replace("/", ":"))
def test_litefs_files_match_manifest(entry: str) -> None:
    m = MANIFEST[entry]
    header, trailer = verify((LITEFS / entry).read_bytes(), Version.V2)
    assert (header.flags, header.page_size, header.commit) == (m["flags"], m["pageSize"], m["commit"])
    assert (header.min_txid, header.max_txid, header.timestamp) == (m["minTXID"], m["maxTXID"], m["ts"])
    assert (header.pre_apply_checksum, header.node_id) == (m["pre"], m["nodeID"])
    assert (header.wal_offset, header.wal_size) == (m["walOffset"], m["walSize"])
    assert (trailer.post_apply_checksum, trailer.file_checksum) == (m["post"], m["fileChecksum"])


@pytest.mark.parametrize("db", LITEFS_DBS)
@pytest.mark.parametrize("kind", ["per-tx", "uploads"])
def test_litefs_chain_applies_to_database(tmp_path: Path, db: str, kind: str) -> None:
    files = per_tx(db) if kind == "per-tx" else uploads(db)
    out = tmp_path / db
    with open(out, "w+b") as f:
        pos = apply_files(f, [p.read_bytes() for p in files], Version.V2)
    assert out.read_bytes() == (LITEFS / "db" / db).read_bytes()
    assert str(pos) == (LITEFS / "db" / f"{db}.pos").read_text().strip()
    with open(out, "rb") as f:
        assert f"{database_checksum_of(f)[0]:016x}" == (LITEFS / "db" / f"{db}.checksum").read_text().strip()


@pytest.mark.parametrize("db", LITEFS_DBS)
def test_compacting_per_tx_ranges_equals_litefs_uploads(db: str) -> None:
    """Each upload LiteFS sent is the compaction of a per-tx range: same pages, commit and checksums."""
    files = {parse_filename(p.name): p for p in per_tx(db)}
    for upload in uploads(db):
        lo, hi = (int(x, 16) for x in upload.stem.rsplit("-", 2)[1:])
        want_h, want_pages, want_t = decode(upload.read_bytes(), Version.V2)
        out = io.BytesIO()
        inputs = [files[(t, t)].read_bytes() for t in range(lo, hi + 1)]
        got_h, got_t = compact(inputs, out, version=Version.V2)
        _, got_pages, _ = decode(out.getvalue(), Version.V2)
        assert got_pages == want_pages, upload.name
        assert (got_h.commit, got_h.min_txid, got_h.max_txid) == (want_h.commit, want_h.min_txid, want_h.max_txid)
        assert got_t.post_apply_checksum == want_t.post_apply_checksum
        if lo > 1:  # LiteFS rebuilds snapshots from the database, with a new timestamp and its node id
            assert got_h.pre_apply_checksum == want_h.pre_apply_checksum
            assert got_h.timestamp == want_h.timestamp
            if not want_h.flags & FLAG_COMPRESS_LZ4:
                assert out.getvalue() == upload.read_bytes()


def test_litestream_replica_files_verify() -> None:
    files = sorted((LITESTREAM / "replica" / "ltx").glob("*/*.ltx"))
    assert len(files) > 100
    for path in files:
        header, trailer = verify(path.read_bytes(), Version.V3)
        assert header.flags == FLAG_NO_CHECKSUM, path
        assert parse_filename(path.name) == (header.min_txid, header.max_txid), path
        assert trailer.post_apply_checksum == 0


@pytest.mark.parametrize("version", [Version.V2, Version.V3])
def test_decoder_memory_is_bounded_by_a_page_and_the_index(tmp_path: Path, version: Version) -> None:
    """Decoding 32 MiB of pages from a stream holds a read window, a page and the index, never the file."""
    import os
    import tracemalloc

    from sidecar.ltx import FLAG_COMPRESS_LZ4, Header
    from sidecar.ltx.encoder import Encoder
    n = 8192
    header = Header(page_size=4096, commit=n, min_txid=1, max_txid=1,
                    flags=FLAG_COMPRESS_LZ4 if version == Version.V2 else 0)
    path = tmp_path / "big.ltx"
    with open(path, "wb") as f:
        enc = Encoder(f, header, version)
        for pgno in range(1, n + 1):
            enc.write_page(pgno, os.urandom(64) * 64)
        enc.close()
    with open(path, "rb") as f:
        tracemalloc.start()
        dec = Decoder(f, version)
        for _pgno, _page in dec.pages():
            pass
        dec.close()
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert dec.page_count * 4096 == 32 << 20
    assert peak < 4 << 20, peak
