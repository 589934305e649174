"""An emulated LiteFS node: real SQLite writes in, the files LiteFS would leave on disk out (docs/litefs.md).

    node = EmulatedNode(data_dir, mount_dir)
    node.execute("app.db", "CREATE TABLE t (x)")          # one SQLite transaction → one LTX file
    node.write("app.db", lambda con: con.executemany(…))  # several statements, still one transaction
    node.pos("app.db")                                    # Pos(txid, post-apply checksum)

LiteFS sees every page SQLite writes through its FUSE mount. The emulator cannot, so the load writes a
private copy, `<data>/work/<db>` (rollback journal: after COMMIT the main file holds every committed page),
and `commit()` diffs it against `<data>/dbs/<db>/database`, which always holds the last recorded state.
What appears on disk is what LiteFS 0.5 writes (§2, §3, §6):

    <data>/clusterid                          cluster ID + "\\n" (primary only generates one)
    <data>/dbs/<db>/database                  the database as of the newest LTX file
    <data>/dbs/<db>/ltx/%016x-%016x.ltx       one LTX v2 file per transaction; `<name>.tmp` while written
    <mount>/<db>                              a copy of the database, for readers
    <mount>/<db>-pos                          "%016x/%016x\\n"; mtime = timestamp of the last LTX file
    <mount>/.primary                          on replicas only: the primary's hostname + "\\n"

The emulator never prunes `ltx/` unless its LiteFS-like retention monitor is switched on (§4).
"""

from __future__ import annotations

import asyncio
import io
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO

from sidecar.fsutil import fsync_dir, write_atomically
from sidecar.ltx import CHECKSUM_FLAG, FLAG_COMPRESS_LZ4, HEADER_SIZE, TRAILER_SIZE, Header, Pos, Trailer, Version
from sidecar.ltx.checksum import crc
from sidecar.ltx.decoder import verify
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.names import format_filename, parse_filename
from sidecar.ltx.sqlite import Applier, database_checksum_of, db_pages, encode_db, sqlite_page_size
from sidecar.ltx.types import lock_pgno

_CHUNK = 1 << 22  # bytes compared at once while diffing; equal chunks cost one memcmp
_RESERVED_SUFFIXES = ("-journal", "-wal", "-shm", "-pos", "-lock")

Event = dict[str, Any]
Subscriber = Callable[[Event], None]


class EmulatorError(Exception):
    """Something LiteFS would refuse; the message is LiteFS's where it has one."""


class DatabaseNotFound(EmulatorError):
    """No database of that name on this node (LiteFS: `database not found`, HTTP 404)."""

    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__("database not found")


class ReadOnlyReplica(EmulatorError):
    """Writes on a replica (LiteFS: `read only replica`; through the mount, EACCES)."""

    def __init__(self) -> None:
        super().__init__("read only replica")


@dataclass(frozen=True, slots=True)
class Tx:
    """One LTX file the node wrote: a transaction, an import or a deletion."""

    db: str
    txid: int
    timestamp: int  # ms since the epoch, the file's header timestamp
    pre_apply_checksum: int
    post_apply_checksum: int
    commit: int  # database size in pages after the transaction
    pages: int  # pages stored in the file
    path: Path

    @property
    def pos(self) -> Pos:
        return Pos(self.txid, self.post_apply_checksum)


def expired_ltx_files(entries: Sequence[tuple[str, float]], *, now: float, retention: float,
                      hwm: int | None) -> list[str]:
    """Names LiteFS's retention monitor deletes from one `ltx/` listing of (name, mtime) (docs/litefs.md §4).

    A file goes iff it is an LTX file name, its mtime is older than `now - retention`, it is not the last
    LTX file by name, and — only when a backup client is configured (`hwm` not None) — MaxTXID < hwm.
    """
    files = sorted((name, mtime) for name, mtime in entries if parse_filename(name) is not None)
    victims: list[str] = []
    for name, mtime in files[:-1]:
        txids = parse_filename(name)
        assert txids is not None
        if mtime < now - retention and (hwm is None or txids[1] < hwm):
            victims.append(name)
    return victims


def _check_name(name: str) -> None:
    if not name or "/" in name or "\0" in name or name in (".", "..") or name.startswith("."):
        raise EmulatorError(f"invalid database name {name!r}")
    if name.endswith(_RESERVED_SUFFIXES):
        raise EmulatorError(f"invalid database name {name!r}: reserved suffix")


def _db_size_pages(head: bytes, file_size: int, page_size: int) -> int:
    """Commit as SQLite defines it: the header's page count when valid, else the file size (fileformat §1.3.7)."""
    in_header = int.from_bytes(head[28:32], "big")
    if in_header and head[24:28] == head[92:96]:
        return in_header
    return file_size // page_size


def _runs(pgnos: Sequence[int]) -> Iterator[tuple[int, int]]:
    """Ascending page numbers as (first, count) runs of consecutive pages."""
    i = 0
    while i < len(pgnos):
        j = i
        while j + 1 < len(pgnos) and pgnos[j + 1] == pgnos[j] + 1:
            j += 1
        yield pgnos[i], j - i + 1
        i = j + 1


@dataclass
class _DB:
    """What the node knows about one database: its position and shape, and who may touch it."""

    name: str
    txid: int = 0
    post: int = 0  # post-apply checksum, with the flag; 0 before TXID 1
    page_size: int = 0
    commit: int = 0
    hwm: int = 0  # in memory only, like LiteFS
    lock: threading.RLock = field(default_factory=threading.RLock)
    con: sqlite3.Connection | None = None

    @property
    def pos(self) -> Pos:
        return Pos(self.txid, self.post)


class _LTXWriter:
    """One LTX file written as LiteFS does: temp file, encode, fsync, rename, fsync the directory (§3)."""

    def __init__(self, final: Path, header: Header, *, tmp_suffix: str = ".tmp", fsync: bool = True) -> None:
        self.final = final
        self.tmp = final.with_name(final.name + tmp_suffix)
        self._fsync = fsync
        self._f: BinaryIO = open(self.tmp, "wb")  # closed by commit() or abort()
        self.enc = Encoder(self._f, header, Version.V2)

    def commit(self, post_apply_checksum: int) -> Trailer:
        try:
            trailer = self.enc.close(post_apply_checksum)
            self._f.flush()
            if self._fsync:
                os.fsync(self._f.fileno())
        except BaseException:
            self.abort()
            raise
        self._f.close()
        os.rename(self.tmp, self.final)
        if self._fsync:
            fsync_dir(self.final.parent)
        return trailer

    def abort(self) -> None:
        self._f.close()
        self.tmp.unlink(missing_ok=True)


class EmulatedNode:
    """A LiteFS node's on-disk behaviour for a sidecar to watch; thread-safe, one lock per database.

    `primary=False` makes a replica of `primary_hostname` (`.primary` is written only when that is known);
    replicas refuse writes and take files through `apply_ltx`, or from a primary via `add_replica`.
    `compress` is `data.compress`, `retention_seconds` and `retention_monitor_interval` are
    `data.retention` and its monitor interval (≤ 0: off, the emulator's default), and `backup=True`
    behaves as if a backup client were configured, so retention waits for `set_hwm`. `node_id` defaults
    to a new random ID, as at every LiteFS start; `clock` (seconds) drives timestamps and file mtimes.
    Opening a data directory that already has databases resumes them as LiteFS does at start-up.
    """

    def __init__(self, data_dir: Path | str, mount_dir: Path | str, *, primary: bool = True,
                 compress: bool = True, node_id: int | None = None, hostname: str = "localhost",
                 primary_hostname: str = "", cluster_id: str | None = None, page_size: int = 4096,
                 retention_seconds: float = 0.0, retention_monitor_interval: float = 60.0,
                 backup: bool = False, fsync: bool = True, clock: Callable[[], float] = time.time) -> None:
        self.data_dir = Path(data_dir)
        self.mount_dir = Path(mount_dir)
        self.compress = compress
        self.node_id = node_id if node_id is not None else (secrets.randbits(64) or 1)  # new at every start (§1)
        self.hostname = hostname
        self.page_size = page_size
        self.retention_seconds = retention_seconds
        self.retention_monitor_interval = retention_monitor_interval
        self.backup = backup  # a backup client is configured: retention waits for the HWM (§4)
        self.fsync = fsync
        self.clock = clock
        self.is_primary = primary
        self.primary_hostname = "" if primary else primary_hostname
        self._dbs: dict[str, _DB] = {}
        self._dbs_lock = threading.Lock()
        self._subscribers: list[Subscriber] = []
        self._replicas: list[EmulatedNode] = []
        for d in (self.data_dir / "dbs", self.data_dir / "work", self.mount_dir):
            d.mkdir(parents=True, exist_ok=True)
        self.cluster_id = cluster_id if cluster_id is not None else self._load_cluster_id()
        self._write_primary_file()
        for path in sorted((self.data_dir / "dbs").iterdir()):
            if path.is_dir():
                self._recover(path.name)

    # -- paths -------------------------------------------------------------------------------------------

    def db_dir(self, name: str) -> Path:
        return self.data_dir / "dbs" / name

    def ltx_dir(self, name: str) -> Path:
        return self.db_dir(name) / "ltx"

    def database_path(self, name: str) -> Path:
        return self.db_dir(name) / "database"

    def work_path(self, name: str) -> Path:
        """The private file SQLite writes; call `commit(name)` after each write transaction on it."""
        return self.data_dir / "work" / name

    def path(self, name: str) -> Path:
        """The database as readers see it in the mount."""
        return self.mount_dir / name

    def pos_path(self, name: str) -> Path:
        return self.mount_dir / f"{name}-pos"

    def ltx_files(self, name: str) -> list[Path]:
        """LTX files in `ltx/`, in TXID order; temp files are skipped as LiteFS skips them."""
        d = self.ltx_dir(name)
        if not d.is_dir():
            return []
        return sorted(p for p in d.iterdir() if parse_filename(p.name) is not None)

    # -- identity and role -------------------------------------------------------------------------------

    def _load_cluster_id(self) -> str:
        path = self.data_dir / "clusterid"
        if path.exists():
            return path.read_text().strip()
        if not self.is_primary:
            return ""  # replicas adopt the primary's
        value = "LFSC" + f"{secrets.randbits(64):016X}"
        write_atomically(path, value + "\n", durable=self.fsync)
        return value

    def _write_primary_file(self) -> None:
        path = self.mount_dir / ".primary"
        if self.is_primary or not self.primary_hostname:
            path.unlink(missing_ok=True)  # absent on the primary and while no primary is known (§6)
        else:
            path.write_text(self.primary_hostname + "\n")

    def set_primary(self, primary: bool, primary_hostname: str = "") -> None:
        """Become primary (`.primary` disappears) or a replica of `primary_hostname`; emits primaryChange."""
        self.is_primary = primary
        self.primary_hostname = "" if primary else primary_hostname
        self._write_primary_file()
        data: dict[str, Any] = {"isPrimary": primary}
        if self.primary_hostname:
            data["hostname"] = self.primary_hostname
        self._emit({"type": "primaryChange", "data": data})

    def info(self) -> dict[str, Any]:
        """What `GET /info` returns (§7)."""
        out: dict[str, Any] = {}
        if self.cluster_id:
            out["clusterID"] = self.cluster_id
        out["isPrimary"] = self.is_primary
        out["candidate"] = self.is_primary
        out["path"] = str(self.data_dir)
        out["primary"] = {"hostname": self.hostname if self.is_primary else self.primary_hostname}
        return out

    # -- databases ---------------------------------------------------------------------------------------

    def databases(self) -> list[str]:
        """Names of every database this node knows, sorted."""
        with self._dbs_lock:
            return sorted(self._dbs)

    def pos(self, name: str) -> Pos:
        """The database's position: the newest TXID and the checksum after it; raises DatabaseNotFound."""
        return self._get(name).pos

    def hwm(self, name: str) -> int:
        return self._get(name).hwm

    def set_hwm(self, name: str, txid: int) -> None:
        """What a backup client's `Litefs-Hwm` response does; it only moves forward (§5)."""
        db = self._get(name)
        with db.lock:
            db.hwm = max(db.hwm, txid)

    def _get(self, name: str) -> _DB:
        with self._dbs_lock:
            db = self._dbs.get(name)
        if db is None:
            raise DatabaseNotFound(name)
        return db

    def _create(self, name: str) -> _DB:
        """CreateDBIfNotExists: the directories and an empty database."""
        _check_name(name)
        with self._dbs_lock:
            db = self._dbs.get(name)
            if db is None:
                self.ltx_dir(name).mkdir(parents=True, exist_ok=True)
                for path in (self.database_path(name), self.work_path(name)):
                    path.touch()  # the mount lists it only once it has pages (§6)
                db = self._dbs[name] = _DB(name)
            return db

    def _recover(self, name: str) -> None:
        """Start-up (§2): the position is the newest LTX file's; the database must match its checksum."""
        db = _DB(name)
        files = self.ltx_files(name)
        database = self.database_path(name)
        database.touch()
        if files:
            data = files[-1].read_bytes()
            header = Header.unpack(data[:HEADER_SIZE])
            trailer = Trailer.unpack(data[-TRAILER_SIZE:])
            db.txid, db.post = header.max_txid, trailer.post_apply_checksum
            db.page_size, db.commit = header.page_size, header.commit
            with open(database, "r+b") as f:
                f.truncate(db.commit * db.page_size)
                checksum, _ = database_checksum_of(f, db.page_size) if db.commit else (CHECKSUM_FLAG, 0)
            if checksum != db.post:
                raise EmulatorError(f"{name}: database checksum {checksum:016x} does not match "
                                    f"{files[-1].name} ({db.post:016x})")
        shutil.copyfile(database, self.work_path(name))  # uncommitted work is rolled back
        if db.commit:
            shutil.copyfile(database, self.path(name))
        with self._dbs_lock:
            self._dbs[name] = db
        if files:
            self._write_pos(db, header.timestamp)

    # -- writing through SQLite --------------------------------------------------------------------------

    def connect(self, name: str) -> sqlite3.Connection:
        """A new connection to the working file (autocommit; the caller closes it and calls `commit`)."""
        self._create(name)
        new = self.work_path(name).stat().st_size == 0
        con = sqlite3.connect(self.work_path(name), isolation_level=None, check_same_thread=False)
        if new:  # on an existing database the pragma would change the page size at the next VACUUM
            con.execute(f"PRAGMA page_size={self.page_size}")
        con.execute("PRAGMA journal_mode=DELETE")  # the main file then holds every committed page
        return con

    def write(self, name: str, fn: Callable[[sqlite3.Connection], object], *,
              transaction: bool = True) -> Tx | None:
        """Run `fn` in one SQLite transaction on `name` and record it; None if it wrote nothing.

        `transaction=False` runs `fn` in autocommit mode (VACUUM needs it); every statement it commits
        then lands in the same LTX file, as if it were one transaction.
        """
        self._require_primary()
        db = self._create(name)
        with db.lock:
            if db.con is None:
                db.con = self.connect(name)
            con = db.con
            if transaction:
                con.execute("BEGIN IMMEDIATE")
                try:
                    fn(con)
                except BaseException:
                    if con.in_transaction:
                        con.execute("ROLLBACK")
                    raise
                con.execute("COMMIT")
            else:
                fn(con)
            return self._record(db)

    def execute(self, name: str, sql: str, params: Sequence[object] = ()) -> Tx | None:
        """One statement as one transaction."""
        return self.write(name, lambda con: con.execute(sql, params))

    def commit(self, name: str) -> Tx | None:
        """Record whatever was committed to the working file since the last call; None if nothing was."""
        self._require_primary()
        db = self._create(name)
        with db.lock:
            return self._record(db)

    def _require_primary(self) -> None:
        if not self.is_primary:
            raise ReadOnlyReplica()

    def _header(self, db: _DB, page_size: int, commit: int, timestamp: int) -> Header:
        txid = db.txid + 1
        return Header(page_size=page_size, commit=commit, min_txid=txid, max_txid=txid, timestamp=timestamp,
                      pre_apply_checksum=db.post if txid > 1 else 0,
                      flags=FLAG_COMPRESS_LZ4 if self.compress else 0, node_id=self.node_id)

    def _now_ms(self) -> int:
        return int(self.clock() * 1000)

    def _record(self, db: _DB) -> Tx | None:
        """Diff the working file against `database` and write the changed pages as the next TXID (§3)."""
        work, database = self.work_path(db.name), self.database_path(db.name)
        with open(work, "rb") as wf, open(database, "r+b") as df:
            wfd, dfd = wf.fileno(), df.fileno()
            size = os.fstat(wfd).st_size
            if size < 100:
                return None  # nothing committed yet
            head = os.pread(wfd, 100, 0)
            page_size = sqlite_page_size(head)
            commit = min(_db_size_pages(head, size, page_size), size // page_size)
            if db.commit and page_size != db.page_size:
                raise EmulatorError(f"{db.name}: page size changed from {db.page_size} to {page_size}")
            old_commit = db.commit if page_size == db.page_size else 0
            header = self._header(db, page_size, commit, self._now_ms())
            final = self.ltx_dir(db.name) / format_filename(header.min_txid, header.max_txid)
            out = _LTXWriter(final, header, fsync=self.fsync)
            try:
                value = db.post & ~CHECKSUM_FLAG
                changed: list[int] = []
                lock = lock_pgno(page_size)
                per_chunk = max(1, _CHUNK // page_size)
                for first in range(1, commit + 1, per_chunk):
                    n = min(per_chunk, commit - first + 1)
                    new = os.pread(wfd, n * page_size, (first - 1) * page_size)
                    old = os.pread(dfd, n * page_size, (first - 1) * page_size) if first <= old_commit else b""
                    if new == old:
                        continue
                    for i in range(n):
                        pgno = first + i
                        page = new[i * page_size:(i + 1) * page_size]
                        prev = old[i * page_size:(i + 1) * page_size] if pgno <= old_commit else b""
                        if pgno == lock or page == prev:
                            continue
                        pgno_crc = crc(pgno.to_bytes(4, "big"))
                        if prev:
                            value ^= crc(prev, pgno_crc)
                        value ^= crc(page, pgno_crc)
                        out.enc.write_page(pgno, page)
                        changed.append(pgno)
                if not changed and commit == old_commit:
                    out.abort()
                    return None
                for pgno in range(commit + 1, old_commit + 1):  # a shrink drops these pages (docs/format.md §4)
                    if pgno != lock:
                        value ^= crc(os.pread(dfd, page_size, (pgno - 1) * page_size), crc(pgno.to_bytes(4, "big")))
            except BaseException:
                out.abort()
                raise
            post = CHECKSUM_FLAG | value
            out.commit(post)
            # The LTX file is durable: now the database catches up, then the position moves (§3).
            mfd = os.open(self.path(db.name), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                for first, count in _runs(changed):
                    data = os.pread(wfd, count * page_size, (first - 1) * page_size)
                    os.pwrite(dfd, data, (first - 1) * page_size)
                    os.pwrite(mfd, data, (first - 1) * page_size)
                os.ftruncate(dfd, commit * page_size)
                os.ftruncate(mfd, commit * page_size)
            finally:
                os.close(mfd)
        return self._advance(db, header, post, len(changed), final)

    def _advance(self, db: _DB, header: Header, post: int, pages: int, path: Path) -> Tx:
        """Move the position to a file just written, tell pos readers, subscribers and replicas."""
        os.utime(path, (self.clock(), self.clock()))  # retention reads mtime; tests may drive the clock
        rec = Tx(db.name, header.max_txid, header.timestamp, header.pre_apply_checksum, post, header.commit,
                 pages, path)
        db.txid, db.post, db.page_size, db.commit = header.max_txid, post, header.page_size, header.commit
        self._write_pos(db, header.timestamp)
        self._emit_tx(db, header)
        for replica in list(self._replicas):
            replica.apply_ltx(db.name, path.read_bytes())
        return rec

    def _write_pos(self, db: _DB, timestamp: int) -> None:
        """`<db>-pos`: always 34 bytes, rewritten in place like a virtual file; mtime = LTX timestamp (§6)."""
        path = self.pos_path(db.name)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, f"{db.pos}\n".encode(), 0)
        finally:
            os.close(fd)
        os.utime(path, ns=(timestamp * 1_000_000, timestamp * 1_000_000))

    # -- import, export, deletion ------------------------------------------------------------------------

    def import_db(self, name: str, src: bytes | bytearray | Path) -> Tx:
        """What `POST /import` does (§3, LiteFS `DB.Import`): the whole database as the next TXID.

        The file is one incremental transaction over every page 1..N (N from header offset 28), or the
        snapshot TXID 1 when the database had none; page 1's change counter and schema cookie are zeroed
        so open connections reload. No integrity check, as in LiteFS. Creates the database if missing.
        """
        self._require_primary()
        data = bytearray(src.read_bytes() if isinstance(src, Path) else src)
        if len(data) < 100 or data[:16] != b"SQLite format 3\0":
            raise EmulatorError("read database header: invalid database header")
        page_size = sqlite_page_size(bytes(data[:100]))
        commit = int.from_bytes(data[28:32], "big")
        if commit == 0:
            raise EmulatorError("read database header: no page count at offset 28")  # LiteFS would write Commit 0
        if len(data) < commit * page_size:
            raise EmulatorError(f"read page {len(data) // page_size + 1}: unexpected EOF")
        del data[commit * page_size:]
        data[24:28] = data[40:44] = bytes(4)
        db = self._create(name)
        with db.lock:
            self._close_con(db)
            header = self._header(db, page_size, commit, self._now_ms())
            final = self.ltx_dir(name) / format_filename(header.min_txid, header.max_txid)
            out = _LTXWriter(final, header, fsync=self.fsync)
            try:
                for pgno, page in db_pages(io.BytesIO(data), page_size, commit):
                    out.enc.write_page(pgno, page)
            except BaseException:
                out.abort()
                raise
            post = out.enc.pages_checksum  # every page was written
            out.commit(post)
            for path in (self.database_path(name), self.path(name), self.work_path(name)):
                write_atomically(path, bytes(data), durable=self.fsync)  # readers see the old or the new, as in LiteFS
            return self._advance(db, header, post, out.enc.page_count, final)

    def export(self, name: str) -> bytes:
        """A consistent copy of the database (`GET /export`); read the pos before or after for its TXID."""
        db = self._get(name)
        with db.lock:
            return self.database_path(name).read_bytes()

    def snapshot(self, name: str) -> bytes:
        """The LTX snapshot LiteFS streams or uploads: TXIDs 1..current, this node's ID, timestamp now (§7.1)."""
        db = self._get(name)
        with db.lock, open(self.database_path(name), "rb") as f:
            if not db.commit:
                raise EmulatorError(f"{name}: no pages to snapshot at position {db.pos}")
            out = io.BytesIO()
            encode_db(f, out, version=Version.V2, compress=self.compress, txid=db.txid, timestamp=self._now_ms(),
                      node_id=self.node_id)
            return out.getvalue()

    def delete_db(self, name: str) -> Tx:
        """Unlink through the mount: a deletion file (Commit 0, no pages, post = FLAG) as the next TXID (§3)."""
        self._require_primary()
        db = self._get(name)
        with db.lock:
            self._close_con(db)
            header = self._header(db, db.page_size or self.page_size, 0, self._now_ms())
            final = self.ltx_dir(name) / format_filename(header.min_txid, header.max_txid)
            out = _LTXWriter(final, header, fsync=self.fsync)
            out.commit(CHECKSUM_FLAG)
            for path in (self.database_path(name), self.work_path(name)):
                path.write_bytes(b"")
            self.path(name).unlink(missing_ok=True)  # 0-page databases are hidden from the mount (§6)
            return self._advance(db, header, CHECKSUM_FLAG, 0, final)

    def _close_con(self, db: _DB) -> None:
        if db.con is not None:
            db.con.close()
            db.con = None

    # -- files from elsewhere: a primary's stream, a restore from backup -------------------------------

    def apply_ltx(self, name: str, data: bytes) -> Pos:
        """Take an LTX file from a primary's stream or a backup restore, as LiteFS does (§3, §4).

        Frames written by this node itself are skipped. The file keeps its bytes (node ID included) under
        its own name, via a `<final>.<random>.tmp` temp file; a snapshot deletes every other file in
        `ltx/`. Raises EmulatorError if an incremental file does not continue the position.
        """
        header, _ = verify(data, Version.V2)
        db = self._create(name)
        with db.lock:
            if header.node_id == self.node_id:
                return db.pos
            if not header.is_snapshot and header.pre_apply_pos != db.pos:
                raise EmulatorError(f"{name}: {format_filename(header.min_txid, header.max_txid)} does not "
                                    f"continue position {db.pos}")
            self._close_con(db)
            final = self.ltx_dir(name) / format_filename(header.min_txid, header.max_txid)
            tmp = final.with_name(f"{final.name}.{secrets.randbelow(1 << 31)}.tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                if self.fsync:
                    os.fsync(f.fileno())
            os.rename(tmp, final)
            if self.fsync:
                fsync_dir(final.parent)
            if header.is_snapshot:
                for path in self.ltx_dir(name).iterdir():
                    if path != final:
                        path.unlink(missing_ok=True)
            with open(self.database_path(name), "r+b") as f:
                Applier(f, Pos() if header.is_snapshot else db.pos).apply(data, Version.V2)
            shutil.copyfile(self.database_path(name), self.work_path(name))
            if header.commit:
                shutil.copyfile(self.database_path(name), self.path(name))
            else:
                self.path(name).unlink(missing_ok=True)
            trailer = Trailer.unpack(data[-TRAILER_SIZE:])
            return self._advance(db, header, trailer.post_apply_checksum, 0, final).pos

    def add_replica(self, replica: EmulatedNode) -> None:
        """Stream to `replica` from now on; it first gets a snapshot of every database it lags on (§7.1)."""
        replica.cluster_id = replica.cluster_id or self.cluster_id
        for name in self.databases():
            db = self._get(name)
            with db.lock:
                if db.commit and replica._pos_or_zero(name) != db.pos:
                    replica.apply_ltx(name, self.snapshot(name))
        self._replicas.append(replica)

    def remove_replica(self, replica: EmulatedNode) -> None:
        self._replicas.remove(replica)

    def _pos_or_zero(self, name: str) -> Pos:
        try:
            return self.pos(name)
        except DatabaseNotFound:
            return Pos()

    # -- events ------------------------------------------------------------------------------------------

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call `fn(event)` (from the writing thread) for every event of `GET /events`; returns unsubscribe."""
        data: dict[str, Any] = {"isPrimary": self.is_primary}
        if self.primary_hostname:
            data["hostname"] = self.primary_hostname
        fn({"type": "init", "data": data})
        self._subscribers.append(fn)

        def unsubscribe() -> None:
            if fn in self._subscribers:
                self._subscribers.remove(fn)

        return unsubscribe

    def _emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    def _emit_tx(self, db: _DB, header: Header) -> None:
        self._emit({"type": "tx", "db": db.name, "data": {
            "txID": f"{db.txid:016x}", "postApplyChecksum": f"{db.post:016x}", "pageSize": header.page_size,
            "commit": header.commit, "timestamp": _go_time(header.timestamp)}})

    # -- retention ---------------------------------------------------------------------------------------

    def enforce_retention(self, now: float | None = None) -> list[Path]:
        """One pass of LiteFS's retention monitor over every database; returns the deleted files (§4)."""
        if self.retention_seconds <= 0:
            return []
        now = self.clock() if now is None else now
        deleted: list[Path] = []
        for name in self.databases():
            db = self._get(name)
            with db.lock:
                entries = []
                for path in self.ltx_dir(name).iterdir():
                    try:
                        entries.append((path.name, path.stat().st_mtime))
                    except FileNotFoundError:
                        continue
                hwm = db.hwm if self.backup else None
                for victim in expired_ltx_files(entries, now=now, retention=self.retention_seconds, hwm=hwm):
                    path = self.ltx_dir(name) / victim
                    try:
                        path.unlink()
                    except FileNotFoundError:
                        continue  # someone else (the sidecar) pruned it first
                    deleted.append(path)
        return deleted

    async def run_retention(self, stop: asyncio.Event, *,
                            on_pass: Callable[[list[Path]], None] | None = None) -> None:
        """Enforce retention every `retention_monitor_interval` seconds until `stop` is set.

        `on_pass(deleted)` is called on the event loop after each pass. Off, as in LiteFS, when the
        retention or the interval is ≤ 0: then it only waits for `stop`.
        """
        if self.retention_seconds <= 0 or self.retention_monitor_interval <= 0:
            await stop.wait()
            return
        while not stop.is_set():
            try:
                async with asyncio.timeout(self.retention_monitor_interval):
                    await stop.wait()
            except TimeoutError:
                deleted = await asyncio.to_thread(self.enforce_retention)
                if on_pass is not None:
                    on_pass(deleted)

    # -- lifetime ----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the node's SQLite connections; files stay as they are (restart by constructing anew)."""
        for name in self.databases():
            db = self._get(name)
            with db.lock:
                self._close_con(db)

    def __enter__(self) -> EmulatedNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _go_time(ms: int) -> str:
    """A millisecond timestamp as Go's `time.Time` marshals to JSON (RFC 3339, trailing zeros trimmed)."""
    text = datetime.fromtimestamp(ms // 1000, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if ms % 1000:
        text += "." + f"{ms % 1000:03d}".rstrip("0")
    return text + "Z"


__all__ = ["DatabaseNotFound", "EmulatedNode", "EmulatorError", "Event", "ReadOnlyReplica", "Tx", "expired_ltx_files"]
