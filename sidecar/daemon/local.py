"""One LiteFS database's `ltx/` directory as the sidecar sees it: which files exist, their headers, pruning.

LiteFS writes `<T>-<T>.ltx` per transaction (a temp name first, then a rename), and a `1-<N>` snapshot after
a restore, when every other file vanishes (docs/litefs.md §3). Names that do not match the pattern are
someone else's temp files and are ignored. A file whose header or checksums do not verify is reported once
and never shipped.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.ltx import HEADER_SIZE, TRAILER_SIZE, Header, LTXError, Trailer, Version, format_filename, parse_filename
from sidecar.ltx.decoder import verify


@dataclass(slots=True)
class LocalFile:
    """One LTX file in `ltx/`; its header is read on first use.

    Its path is not stored but rebuilt from the directory (one string shared by every file) and the TXIDs: a
    database holds up to 600,000 of these, and a Path each took two thirds of their memory.
    """

    dir: str
    min_txid: int
    max_txid: int
    mtime: float
    size: int
    header: Header | None = None
    trailer: Trailer | None = None

    @property
    def name(self) -> str:
        return format_filename(self.min_txid, self.max_txid)

    @property
    def fspath(self) -> str:
        return f"{self.dir}/{format_filename(self.min_txid, self.max_txid)}"

    @property
    def path(self) -> Path:
        return Path(self.fspath)

    def read_header(self) -> tuple[Header, Trailer]:
        """The header and trailer, read from the file's two ends (the body is verified when it is shipped)."""
        if self.header is None or self.trailer is None:
            with open(self.fspath, "rb") as f:
                head = f.read(HEADER_SIZE)
                f.seek(-TRAILER_SIZE, os.SEEK_END)
                tail = f.read(TRAILER_SIZE)
            self.header = Header.unpack(head)
            self.trailer = Trailer.unpack(tail)
            if (self.header.min_txid, self.header.max_txid) != (self.min_txid, self.max_txid):
                raise LTXError(f"header TXIDs {self.header.min_txid:016x}-{self.header.max_txid:016x} differ "
                               f"from the file name", field="min_txid")
        return self.header, self.trailer

    @property
    def post(self) -> int:
        return self.read_header()[1].post_apply_checksum

    @property
    def pre(self) -> int:
        return self.read_header()[0].pre_apply_checksum


class Packed:
    """Shipped per-transaction files `lo..hi` (every TXID between, oldest first), each known by its mtime and size
    alone: 16 bytes a file instead of a LocalFile's ~220. At 1,000 tx/s a 10-minute retention holds 600,000 files,
    nearly all of them shipped and waiting only to be pruned; as objects they took 126 MiB."""

    def __init__(self) -> None:
        self.lo = 0
        self.mtimes = array("d")
        self.sizes = array("q")

    def __len__(self) -> int:
        return len(self.mtimes)

    @property
    def hi(self) -> int:
        """The newest packed TXID (lo - 1 when empty)."""
        return self.lo + len(self.mtimes) - 1

    def __contains__(self, txid: int) -> bool:
        return self.lo <= txid <= self.hi

    def extend(self, first: int, mtimes: list[float], sizes: list[int]) -> None:
        """Pack the files `first`, `first + 1`, … (the caller checks that they follow `hi`)."""
        if not self.mtimes:
            self.lo = first
        self.mtimes.extend(mtimes)
        self.sizes.extend(sizes)

    def file(self, base: str, txid: int) -> LocalFile:
        """A LocalFile for packed `txid` (made anew: its header, if read, is not kept)."""
        i = txid - self.lo
        return LocalFile(base, txid, txid, self.mtimes[i], self.sizes[i])

    def drop_oldest(self, n: int) -> None:
        del self.mtimes[:n], self.sizes[:n]
        self.lo += n


@dataclass
class LocalDB:
    """The LTX files of one database, keyed by max TXID, kept in step with the directory by `scan()`.

    Change `files` only through `scan`, `add`, `discard` and `delete`: they keep two small indexes in step, so
    that `head` and `chain_from` cost O(files returned) instead of O(files held). That matters: at 1,000 tx/s
    and a 10-minute retention a database holds 600,000 files, and every tick asks for both several times.

    The oldest files, once shipped, are moved out of `files` into `packed` (`pack`): they are only pruned, or
    shipped again in the rare case upstream lost them, and every method here sees them as before (`get`, `oldest`,
    `chain_from`, `above`, `count`). Anything unusual about them (a packed file deleted by someone else, a snapshot
    among them) puts them back in `files` first (`unpack`).
    """

    name: str
    dir: Path
    files: dict[int, LocalFile] = field(default_factory=dict)
    bad: set[Path] = field(default_factory=set)  # reported once, never shipped
    packed: Packed = field(default_factory=Packed, repr=False, compare=False)  # shipped files older than `files`
    _keys: list[int] = field(default_factory=list, init=False, repr=False, compare=False)  # sorted(files)
    # Files holding more than one TXID (snapshots), by min TXID; a per-transaction file T is files[T].
    _spans: dict[int, list[LocalFile]] = field(default_factory=dict, init=False, repr=False, compare=False)
    _dir: str = field(default="", init=False, repr=False, compare=False)  # str(dir), shared by every LocalFile

    def __post_init__(self) -> None:
        self._dir = str(self.dir)
        self._reindex()

    @property
    def count(self) -> int:
        """How many files are held, packed ones included."""
        return len(self.files) + len(self.packed)

    def get(self, txid: int) -> LocalFile | None:
        """The file whose max TXID is `txid`, packed or not."""
        f = self.files.get(txid)
        if f is None and txid in self.packed:
            return self.packed.file(self._dir, txid)
        return f

    def has(self, txid: int) -> bool:
        return txid in self.files or txid in self.packed

    def pack(self, below: int) -> int:
        """Pack the oldest per-transaction files with max TXID < `below` (shipped: the caller's HWM), as long as
        they follow the packed ones without a gap; never the newest file nor a bad one. Returns how many."""
        self._in_step()
        keys, files, packed, bad = self._keys, self.files, self.packed, self.bad
        limit = len(keys) - 1  # never the newest
        n, nxt = 0, packed.hi + 1 if packed else None  # the TXID the next packed file must have
        mtimes: list[float] = []
        sizes: list[int] = []
        while n < limit and (t := keys[n]) < below:
            f = files[t]
            if f.min_txid != t or (nxt is not None and t != nxt) or (bad and not self.good(f)):
                break
            mtimes.append(f.mtime)
            sizes.append(f.size)
            nxt = t + 1
            n += 1
        if n:
            packed.extend(keys[0], mtimes, sizes)
            for t in keys[:n]:
                del files[t]
            del keys[:n]
            if n > len(keys):  # a dict never shrinks as keys are deleted: copied, it takes the room it needs
                self.files = {t: files[t] for t in keys}
        return n

    def unpack(self) -> None:
        """Put every packed file back in `files`."""
        if not self.packed:
            return
        packed, base = self.packed, self._dir
        for txid in range(packed.lo, packed.hi + 1):
            self.files[txid] = packed.file(base, txid)
        self.packed = Packed()
        self._reindex()

    def good(self, f: LocalFile) -> bool:
        """Not known to be bad (`bad` is nearly always empty: no path is built then)."""
        return not self.bad or f.path not in self.bad

    def _reindex(self) -> None:
        self._keys = sorted(self.files)
        self._spans = {}
        for f in self.files.values():
            if f.min_txid != f.max_txid:
                self._spans.setdefault(f.min_txid, []).append(f)

    def _in_step(self) -> None:
        """Rebuild the indexes if `files` was changed directly (a safety net: O(1) when they are in step)."""
        if len(self._keys) != len(self.files):
            self._reindex()

    def _insert(self, f: LocalFile) -> None:
        if f.max_txid <= self.packed.hi:  # an old file found late: rare; the packed go back first
            if f.min_txid == f.max_txid and f.max_txid in self.packed:
                return  # already held
            self.unpack()
        self._in_step()
        self.files[f.max_txid] = f
        if not self._keys or f.max_txid > self._keys[-1]:
            self._keys.append(f.max_txid)  # the usual case: the next transaction
        else:
            bisect.insort(self._keys, f.max_txid)
        if f.min_txid != f.max_txid:
            self._spans.setdefault(f.min_txid, []).append(f)

    def _unindex(self, f: LocalFile) -> None:
        """Drop `f` (already gone from `files`) from `_spans`; `_keys` is the caller's."""
        if f.min_txid != f.max_txid:
            same = self._spans[f.min_txid]
            del same[next(i for i, g in enumerate(same) if g is f)]
            if not same:
                del self._spans[f.min_txid]

    def scan(self) -> None:
        """Re-read the directory listing; headers already read are kept for files still present. Packed files stay
        packed (and are not stat'ed) if every one is still there and nothing else is among them."""
        found: dict[int, LocalFile] = {}
        try:
            entries = list(os.scandir(self.dir))
        except FileNotFoundError:
            entries = []
        named = [(entry, txids) for entry in entries if (txids := parse_filename(entry.name)) is not None]
        packed = self.packed
        if packed:
            hi = packed.hi
            under = [txids for _, txids in named if txids[1] <= hi]
            if len(under) != len(packed) or any(a != b or a < packed.lo for a, b in under):
                self.unpack()  # a packed file is gone, or another file is among them: judge them one by one
            else:
                named = [(entry, txids) for entry, txids in named if txids[1] > hi]
        for entry, txids in named:
            try:
                st = entry.stat()
            except FileNotFoundError:
                continue  # pruned by LiteFS or replaced by a snapshot while we listed
            old = self.files.get(txids[1])
            if old is not None and old.min_txid == txids[0] and old.size == st.st_size:
                old.mtime = st.st_mtime
                found[txids[1]] = old
            else:
                found[txids[1]] = LocalFile(self._dir, txids[0], txids[1], st.st_mtime, st.st_size)
        self.files = found
        self._reindex()

    def add(self, path: Path) -> None:
        """A file the watcher saw appear (cheaper than a scan of a large directory)."""
        txids = parse_filename(path.name)
        if txids is None or self.has(txids[1]):
            return
        try:
            st = path.stat()
        except FileNotFoundError:
            return
        self._insert(LocalFile(self._dir, txids[0], txids[1], st.st_mtime, st.st_size))

    def probe(self) -> int:
        """Look for the next per-transaction files by name (`<T+1>-<T+1>.ltx`, …) after the head; returns how many
        were found. LiteFS names them predictably, so this sees a new file as soon as it is renamed into place,
        without waiting for the watcher's batch of events, at the cost of one failed stat per tick."""
        head = self._keys[-1] if self._keys else self.packed.hi if self.packed else None
        if head is None:
            return 0
        # Runs once per transaction (1,000 times a second at 1,000 tx/s): a string path, not a Path, and the files
        # found go into the index at once. Every one is above the head, so none is held yet.
        txid = head + 1
        stat, base, found = os.stat, self._dir, []
        while True:
            try:
                st = stat(f"{base}/{format_filename(txid, txid)}")
            except FileNotFoundError:
                break
            found.append(LocalFile(base, txid, txid, st.st_mtime, st.st_size))
            txid += 1
        if found:
            self._in_step()
            self.files.update(zip(range(head + 1, txid), found, strict=True))
            self._keys += range(head + 1, txid)
        return len(found)

    def discard(self, path: Path) -> None:
        """A file the watcher saw disappear."""
        txids = parse_filename(path.name)
        if txids is not None and txids[0] == txids[1] and txids[1] in self.packed:
            if txids[1] == self.packed.lo:
                self.packed.drop_oldest(1)
                return
            self.unpack()
        if txids is not None and (f := self.files.get(txids[1])) is not None and f.path == path:
            self._in_step()
            del self.files[txids[1]]
            del self._keys[bisect.bisect_left(self._keys, txids[1])]
            self._unindex(f)

    def sorted(self) -> list[LocalFile]:
        return list(self.oldest())

    def oldest(self) -> Iterator[LocalFile]:
        """Files in TXID order, lazily (do not change the files while iterating)."""
        self._in_step()
        packed, base = self.packed, self._dir
        if packed:
            yield from (packed.file(base, t) for t in range(packed.lo, packed.hi + 1))
        yield from (self.files[k] for k in self._keys)

    def newest(self) -> Iterator[LocalFile]:
        """Files in reverse TXID order, lazily (do not change the files while iterating): a search for a recent
        file reads only as far back as it must."""
        self._in_step()
        packed, base = self.packed, self._dir
        yield from (self.files[k] for k in reversed(self._keys))
        if packed:
            yield from (packed.file(base, t) for t in range(packed.hi, packed.lo - 1, -1))

    def above(self, txid: int) -> list[LocalFile]:
        """Files whose max TXID is above `txid`, in TXID order."""
        self._in_step()
        packed, base = self.packed, self._dir
        older = [packed.file(base, t) for t in range(max(txid + 1, packed.lo), packed.hi + 1)] if packed else []
        return older + self._newer(txid)

    def _newer(self, txid: int) -> list[LocalFile]:
        """The unpacked files whose max TXID is above `txid`, in TXID order."""
        return [self.files[k] for k in self._keys[bisect.bisect_right(self._keys, txid):]]

    def backlog(self, txid: int) -> tuple[int, int, float | None]:
        """The files above `txid`: how many, their bytes, and the oldest one's mtime (None if there is none); without
        making objects of packed files (every tick asks, and upstream's position may be far behind)."""
        self._in_step()
        packed = self.packed
        count, size, first = 0, 0, None
        if packed and txid < packed.hi:
            i = max(txid + 1, packed.lo) - packed.lo
            count, size, first = len(packed) - i, sum(packed.sizes[i:]), packed.mtimes[i]
        newer = self._newer(txid)
        if newer and first is None:
            first = newer[0].mtime
        return count + len(newer), size + sum(f.size for f in newer), first

    @property
    def head(self) -> LocalFile | None:
        """The newest file that is not known to be bad."""
        self._in_step()
        for k in reversed(self._keys):
            if self.good(f := self.files[k]):
                return f
        if self.packed:  # every unpacked file is gone or bad (packed files are good)
            return self.packed.file(self._dir, self.packed.hi)
        return None

    def verify_above(self, txid: int) -> list[tuple[LocalFile, str]]:
        """Verify every file past `txid`; returns the bad ones with why (each is then skipped)."""
        return [(f, why) for f in self.above(txid) if self.good(f) and (why := self.check(f)) is not None]

    def chain_from(self, txid: int, limit: int, max_bytes: int = 0) -> list[LocalFile]:
        """Up to `limit` files forming an unbroken chain that starts at TXID `txid`; [] if none starts there. With
        `max_bytes`, the files after the first stop before their sizes pass it."""
        self._in_step()
        out: list[LocalFile] = []
        packed = self.packed
        size = 0

        def full(f: LocalFile) -> bool:
            return bool(max_bytes and out and size + f.size > max_bytes)

        while len(out) < limit and txid in packed:  # upstream lost what it had been sent: rare
            old = packed.file(self._dir, txid)
            if full(old):
                return out
            out.append(old)
            size += old.size
            txid += 1
        while len(out) < limit:
            if txid in self._spans:
                # Rare (a snapshot): of the files starting at `txid`, the last good one in `files` order wins.
                f = next((g for g in reversed(self.files.values()) if g.min_txid == txid and self.good(g)), None)
            else:
                f = self.files.get(txid)
                if f is not None and (f.min_txid != txid or not self.good(f)):
                    f = None
            if f is None or full(f):
                break
            out.append(f)
            size += f.size
            txid = f.max_txid + 1
        return out

    def read_header(self, f: LocalFile) -> tuple[Header, Trailer]:
        """`f.read_header()`; a file whose header or trailer does not read is remembered as bad, and the LTXError
        raised names it (FileNotFoundError passes through: the file went away since the listing)."""
        try:
            return f.read_header()
        except FileNotFoundError:
            raise
        except (LTXError, OSError, ValueError) as err:
            self.bad.add(f.path)
            raise LTXError(f"{f.path}: {err}") from err

    def check(self, f: LocalFile) -> str | None:
        """Verify one file end to end; returns why it is bad, or None. A bad file is remembered."""
        try:
            with open(f.fspath, "rb") as fp:
                header, trailer = verify(fp, Version.V2)
            f.header, f.trailer = header, trailer
            if (header.min_txid, header.max_txid) != (f.min_txid, f.max_txid):
                raise LTXError("header TXIDs differ from the file name", field="min_txid")
        except FileNotFoundError:
            return None
        except (LTXError, OSError, ValueError) as err:
            self.bad.add(f.path)
            return str(err)
        return None

    def delete(self, victims: list[LocalFile]) -> None:
        """Unlink files and fsync the directory once."""
        packed = self.packed
        if packed:
            old = [f.max_txid for f in victims if f.min_txid == f.max_txid and f.max_txid in packed]
            if old == list(range(packed.lo, packed.lo + len(old))):  # the usual case: the oldest, in order
                packed.drop_oldest(len(old))
            else:
                self.unpack()
        self._in_step()
        gone: list[int] = []
        for f in victims:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f.fspath)
            if (held := self.files.pop(f.max_txid, None)) is not None:
                self._unindex(held)
                gone.append(held.max_txid)
        if gone:  # victims are the oldest files: splice one range of `_keys` instead of deleting one by one
            lo, hi = bisect.bisect_left(self._keys, min(gone)), bisect.bisect_right(self._keys, max(gone))
            self._keys[lo:hi] = [k for k in self._keys[lo:hi] if k in self.files]
        if victims:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def prune_victims(files: Iterable[LocalFile], hwm: int | None, now: float, retention: float) -> list[LocalFile]:
    """The files the sidecar may delete: older than `retention`, max TXID ≤ `hwm`, and never the newest.

    `files` come in TXID order (`LocalDB.sorted()` or `.oldest()`); `hwm` is in local TXIDs, None meaning
    upstream has confirmed nothing yet. The walk stops at the first file that is too new or above the HWM, so
    a tick costs O(victims), not O(files held): LiteFS writes files in TXID order, so a later file is not
    older, and should one be (a clock step), it is only kept a little longer.
    """
    if hwm is None:
        return []
    cutoff = now - retention
    out: list[LocalFile] = []
    prev: LocalFile | None = None
    for f in files:
        if prev is not None:
            out.append(prev)  # `prev` is not the newest: `f` comes after it
        if f.max_txid > hwm or f.mtime >= cutoff:
            return out
        prev = f
    return out  # the last file walked is the newest: never deleted


def list_databases(data_dir: Path) -> list[str]:
    """Names of the databases under `<data-dir>/dbs/` that have an `ltx/` directory."""
    try:
        return sorted(e.name for e in os.scandir(data_dir / "dbs") if e.is_dir() and (Path(e.path) / "ltx").is_dir())
    except FileNotFoundError:
        return []


__all__ = ["LocalDB", "LocalFile", "list_databases", "prune_victims"]
