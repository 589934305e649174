"""Change a SQLite database file in place so that its readers only ever see whole transactions. No asyncio.

The replica file is written the way SQLite itself writes in rollback-journal mode (docs/serverless.md):

1. `BEGIN EXCLUSIVE` on a connection to the file: readers finish their transactions; new ones wait.
2. The original content of every page about to change goes into `<file>-journal`, SQLite's own rollback
   journal format, and is made durable: header (magic, record count, checksum nonce, original page count,
   sector size, page size), then per page its number, bytes and checksum (the nonce plus every 200th
   byte). The record count is written last, so a journal cut short rolls nothing back.
3. The new pages are written, the file truncated to the new size, and fsynced.
4. The journal is deleted: the commit point. Then COMMIT releases the lock.

If the process dies between 2 and 4, the journal is hot: the next connection to open the file, ours
or any reader with write access, rolls the change back. Page 1 is always rewritten with the header
fields readers rely on (`stamp`): rollback-journal mode, and a change counter that differs for every
state, so their page caches are dropped exactly when the content changed.
"""

from __future__ import annotations

import os
import random
import sqlite3
import struct
from collections.abc import Callable, Iterable
from pathlib import Path

from sidecar.fsutil import fsync_dir
from sidecar.ltx import lock_pgno
from sidecar.ltx.types import valid_page_size

MAGIC = bytes.fromhex("d9d505f920a163d7")
SECTOR = 512
BUSY_TIMEOUT = 60.0  # seconds to wait for readers to finish their transactions


def stamp(page1: bytes, counter: int, commit: int) -> bytes:
    """Page 1 with the fields a reader trusts set: file format 1/1 (rollback journal, so no -wal or -shm is
    needed), change counter and "version valid for" = `counter`, in-header database size = `commit`."""
    buf = bytearray(page1)
    buf[18:20] = b"\x01\x01"
    c = (counter & 0xFFFFFFFF).to_bytes(4, "big")
    buf[24:28], buf[92:96] = c, c
    buf[28:32] = commit.to_bytes(4, "big")
    return bytes(buf)


def counter_of(path: Path) -> int | None:
    """The change counter in a database file's header, or None if there is no complete header."""
    try:
        with open(path, "rb") as f:
            head = f.read(100)
    except FileNotFoundError:
        return None
    return int.from_bytes(head[24:28], "big") if len(head) == 100 else None


def _checksum(nonce: int, page: bytes) -> int:
    total = nonce
    i = len(page) - 200
    while i > 0:
        total += page[i]
        i -= 200
    return total & 0xFFFFFFFF


def _page_size_of(header: bytes) -> int | None:
    """The page size a database file's header gives (bytes 16-17, 1 meaning 65536), None if there is none."""
    if len(header) < 100 or not header.startswith(b"SQLite format 3\0"):
        return None
    value = int.from_bytes(header[16:18], "big")
    size = 65536 if value == 1 else value
    return size if valid_page_size(size) else None


def rewrite(path: Path, page_size: int, commit: int, pgnos: Iterable[int], page: Callable[[int], bytes],
            counter: int) -> None:
    """Replace pages `pgnos` of the database at `path` (by `page(pgno)`), set its size to `commit` pages and
    stamp page 1 with `counter`, as one transaction: readers see all of it or none of it.

    `pgnos` must ascend; page 1 is always rewritten. Pages beyond `commit` are dropped.
    """
    # One descriptor for the whole transaction, closed only after SQLite let go of its lock: closing any
    # descriptor of a file drops every POSIX lock this process holds on it, SQLite's included.
    fd = os.open(path, os.O_RDWR)
    try:
        con = sqlite3.connect(path, timeout=BUSY_TIMEOUT, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode=DELETE")  # a hot journal left by a crash is rolled back here
            con.execute("BEGIN EXCLUSIVE")
            try:
                _rewrite_locked(fd, path, page_size, commit, pgnos, page, counter)
            finally:
                con.execute("COMMIT")  # nothing of its own to commit: this releases the lock
        finally:
            con.close()
    finally:
        os.close(fd)


def _rewrite_locked(fd: int, path: Path, page_size: int, commit: int, pgnos: Iterable[int],
                    page: Callable[[int], bytes], counter: int) -> None:
    journal = Path(f"{path}-journal")
    lock = lock_pgno(page_size)
    todo = sorted({1, *pgnos})
    size = os.fstat(fd).st_size
    old_size = _page_size_of(os.pread(fd, 100, 0)) or page_size
    if old_size == page_size:
        old_pages = size // page_size
        saved = sorted(({p for p in todo if p <= old_pages} | set(range(commit + 1, old_pages + 1))) - {lock})
    else:
        # The page size changes (a rebuild): the journal holds the whole old file in its own page size, which
        # SQLite's rollback takes from the journal's header; counted in the new size, a tail would be lost.
        old_pages = size // old_size
        saved = [p for p in range(1, old_pages + 1) if p != lock_pgno(old_size)]
    nonce = random.getrandbits(32)
    with open(journal, "wb") as j:
        j.write(MAGIC + struct.pack(">IIIII", 0, nonce, old_pages, SECTOR, old_size).ljust(SECTOR - 8, b"\0"))
        for p in saved:
            old = os.pread(fd, old_size, (p - 1) * old_size)
            j.write(struct.pack(">I", p) + old + struct.pack(">I", _checksum(nonce, old)))
        j.flush()
        os.fsync(j.fileno())
        j.seek(8)
        j.write(struct.pack(">I", len(saved)))  # now the journal is hot
        j.flush()
        os.fsync(j.fileno())
    fsync_dir(path.parent)
    for p in todo:
        if p > commit or p == lock:
            continue
        data = page(p)
        if len(data) != page_size:
            raise ValueError(f"page {p}: {len(data)} bytes, want {page_size}")
        if p == 1:
            data = stamp(data, counter, commit)
        os.pwrite(fd, data, (p - 1) * page_size)
    os.ftruncate(fd, commit * page_size)
    os.fsync(fd)
    journal.unlink()  # the commit point
    fsync_dir(path.parent)


__all__ = ["counter_of", "rewrite", "stamp"]
