"""Build real, checksummed LTX chains from a model of a database (a dict of page number → bytes)."""

from __future__ import annotations

import io

from sidecar.ltx import FLAG_COMPRESS_LZ4, FLAG_NO_CHECKSUM, Header, Version
from sidecar.ltx.checksum import database_checksum
from sidecar.ltx.encoder import Encoder

PAGE = 512


def page(fill: int, pgno: int, size: int = PAGE) -> bytes:
    """A recognisable page; page 1 starts with a SQLite header so appliers can read the page size."""
    data = bytes([fill % 256, pgno % 256]) * (size // 2)
    if pgno == 1:
        head = b"SQLite format 3\x00" + (1 if size == 65536 else size).to_bytes(2, "big")
        data = head + data[len(head):]
    return data


def checksum(db: dict[int, bytes], size: int = PAGE) -> int:
    return database_checksum(sorted(db.items()), size)


def build_chain(txs: list[tuple[int, dict[int, int]]], *, version: Version = Version.V2, lz4: bool = False,
                size: int = PAGE, start_txid: int = 1) -> tuple[list[bytes], dict[int, bytes]]:
    """Encode transactions (commit, {pgno: fill}) as a chain; the first is a snapshot. Returns files, final db."""
    db: dict[int, bytes] = {}
    files = []
    flags = FLAG_COMPRESS_LZ4 if (lz4 and version == Version.V2) else 0
    for i, (commit, writes) in enumerate(txs):
        txid = start_txid + i
        snapshot = i == 0 and start_txid == 1
        pre = 0 if snapshot else checksum(db, size)
        old_commit = max(db, default=0)
        for pgno in [p for p in db if p > commit]:
            del db[pgno]
        changed = {p: page(f, p, size) for p, f in writes.items() if p <= commit}
        for p in range(old_commit + 1, commit + 1):  # growth writes every new page
            changed.setdefault(p, page(0, p, size))
        if snapshot:
            changed = {p: changed.get(p, page(0, p, size)) for p in range(1, commit + 1)}
        db.update(changed)
        header = Header(page_size=size, commit=commit, min_txid=txid, max_txid=txid, timestamp=1000 * txid,
                        pre_apply_checksum=pre, flags=flags)
        out = io.BytesIO()
        enc = Encoder(out, header, version)
        for p in sorted(changed):
            enc.write_page(p, changed[p])
        enc.close(checksum(db, size))
        files.append(out.getvalue())
    return files, db


def to_v3_no_checksum(files: list[bytes]) -> list[bytes]:
    """Re-encode v2 files as Litestream's v3 flavour (no database checksums)."""
    from sidecar.ltx.decoder import decode

    out = []
    for data in files:
        h, pages, _ = decode(data, Version.V2)
        buf = io.BytesIO()
        enc = Encoder(buf, h.replace(flags=FLAG_NO_CHECKSUM, pre_apply_checksum=0), Version.V3)
        for p, d in pages:
            enc.write_page(p, d)
        enc.close(0)
        out.append(buf.getvalue())
    return out
