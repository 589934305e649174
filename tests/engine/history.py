"""A real SQLite database whose commits become LiteFS-style v2 LTX uploads, on a clock the test drives."""

from __future__ import annotations

import io
import random
import sqlite3
from pathlib import Path

from sidecar.ltx import FLAG_COMPRESS_LZ4, Header, Pos, Version, lock_pgno
from sidecar.ltx.checksum import crc
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.types import CHECKSUM_FLAG


class History:
    """Runs SQL on a real database; `commit()` returns the LTX v2 file of the pages that changed."""

    def __init__(self, path: Path, page_size: int = 4096, seed: int = 1) -> None:
        self.path = path
        self.con = sqlite3.connect(path, isolation_level=None)
        self.con.execute(f"PRAGMA page_size={page_size}")
        self.con.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, at INTEGER, body TEXT)")
        self.page_size = page_size
        self.pages: dict[int, int] = {}  # pgno -> crc of the page as last shipped
        self.pos = Pos()
        self.rng = random.Random(seed)
        self.checksums: dict[int, int] = {}  # txid -> post-apply checksum
        self.times: dict[int, int] = {}  # txid -> timestamp ms

    def close(self) -> None:
        self.con.close()

    def write(self, n: int = 5, at: int = 0) -> None:
        """One SQLite transaction of inserts, an occasional update and delete."""
        self.con.execute("BEGIN")
        self.con.executemany("INSERT INTO events (at, body) VALUES (?, ?)",
                             [(at, "e" * self.rng.randint(10, 400)) for _ in range(n)])
        if self.rng.random() < 0.3:
            self.con.execute("UPDATE events SET body = body || 'u' WHERE id % 7 = ?", (self.rng.randint(0, 6),))
        if self.rng.random() < 0.2:
            self.con.execute("DELETE FROM events WHERE id % 11 = ?", (self.rng.randint(0, 10),))
        self.con.execute("COMMIT")

    def commit(self, timestamp: int, compress: bool = True) -> bytes:
        """The LTX file from the last shipped state to now (one TXID), as LiteFS would write it."""
        data = self.path.read_bytes()
        ps = self.page_size
        commit = len(data) // ps
        lock = lock_pgno(ps)
        txid = self.pos.txid + 1
        changed = []
        value = 0
        new_pages = {}
        for i in range(commit):
            pgno = i + 1
            if pgno == lock:
                continue
            page = data[i * ps:(i + 1) * ps]
            c = crc(page, crc(pgno.to_bytes(4, "big")))
            new_pages[pgno] = c
            value ^= c
            if txid == 1 or self.pages.get(pgno) != c:
                changed.append((pgno, page))
        post = CHECKSUM_FLAG | value
        header = Header(page_size=ps, commit=commit, min_txid=txid, max_txid=txid, timestamp=timestamp,
                        pre_apply_checksum=self.pos.post_apply_checksum if txid > 1 else 0,
                        flags=FLAG_COMPRESS_LZ4 if compress else 0, node_id=7)
        out = io.BytesIO()
        enc = Encoder(out, header, Version.V2)
        for pgno, page in changed:
            enc.write_page(pgno, page)
        enc.close(post)
        self.pages = new_pages
        self.pos = Pos(txid, post)
        self.checksums[txid] = post
        self.times[txid] = timestamp
        return out.getvalue()
