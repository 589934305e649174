"""The index of restore points: every stored LTX file of one database, by level.

The engine keeps it in memory and in a small JSON file in its state directory, so listing and planning
cost no LIST or HEAD request; `scan` rebuilds it from the store (one LIST, one 100-byte ranged GET per
file for the header) when the file is lost, and reads Litestream replicas the same way.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import json
import secrets
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import NotFound
from sidecar.fsutil import write_atomically
from sidecar.ltx import HEADER_SIZE, Header, InvalidHeader, LTXError
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.layout import SNAPSHOT_LEVEL, Layout, LTXKey


@dataclass(frozen=True, slots=True)
class FileEntry:
    """One stored LTX file. `pre`/`post` are database checksums (0 when the file has none)."""

    level: int
    min_txid: int
    max_txid: int
    timestamp: int  # ms: the header timestamp, i.e. the time of the file's last transaction
    size: int
    commit: int = 0
    page_size: int = 0
    pre: int = 0
    post: int = 0

    @property
    def is_snapshot(self) -> bool:
        return self.min_txid == 1

    def key(self, layout: Layout, prefix: str) -> str:
        """This file's key in a store of `layout`, under the database prefix `prefix`."""
        return layout.ltx_key(prefix, self.level, self.min_txid, self.max_txid)

    @classmethod
    def from_header(cls, level: int, header: Header, size: int, post: int | None = None) -> FileEntry:
        sums = header.db_checksums
        if not header.no_checksum:
            sums = (header.pre_apply_checksum, post or 0)
        pre, post_ck = sums if sums else (0, 0)
        return cls(level, header.min_txid, header.max_txid, header.timestamp, size, header.commit,
                   header.page_size, pre, post_ck)


def _order(e: FileEntry) -> tuple[int, int]:
    return (e.min_txid, e.max_txid)


def astuple(e: FileEntry) -> tuple[int, ...]:
    return (e.level, e.min_txid, e.max_txid, e.timestamp, e.size, e.commit, e.page_size, e.pre, e.post)


_VERSIONS = itertools.count(1)


class DbIndex:
    """The files of one database, per level, sorted by TXID.

    A database backed up for a day holds thousands of files (8,640 L0 files at one every 10 s), and a flush
    consults the index at every upload: adding the newest file, the HWM and the stored size are O(1) (the HWM is
    walked again from every file only after a removal, or while a gap breaks the chain).
    """

    def __init__(self, entries: Iterable[FileEntry] = ()) -> None:
        self.levels: dict[int, list[FileEntry]] = {}
        for e in entries:
            self.levels.setdefault(e.level, []).append(e)
        for files in self.levels.values():
            files.sort(key=_order)
        self._totals()
        self.changes: list[tuple[str, FileEntry]] = []  # ("+" or "-", file) since the cache last took them
        # Unique to this index's current contents in this process, for caches of what is derived from it: its
        # counts and sizes alone can come back (a database deleted and started over, the same TXIDs and sizes).
        self.version = next(_VERSIONS)

    def _totals(self) -> None:
        self._max_txid = max((e.max_txid for files in self.levels.values() for e in files), default=0)
        self._size = sum(e.size for files in self.levels.values() for e in files)
        self._len = sum(len(files) for files in self.levels.values())
        self._hwm: int | None = None  # the end of the restorable chain; None until walked (`hwm`)
        self._tip: set[int] = set()  # the post-apply checksums of the states the chain reaches at `_hwm`

    def __iter__(self) -> Iterator[FileEntry]:
        for level in sorted(self.levels):
            yield from self.levels[level]

    def __len__(self) -> int:
        return self._len

    def level(self, level: int) -> list[FileEntry]:
        return self.levels.get(level, [])

    def add(self, entry: FileEntry) -> None:
        files = self.levels.setdefault(entry.level, [])
        if not files or _order(files[-1]) <= _order(entry):
            files.append(entry)  # the usual case: a flush or compaction adds the newest file of its level
        else:
            bisect.insort(files, entry, key=_order)
        if self._hwm is not None:
            hwm, p = self._hwm, entry.min_txid - 1
            if hwm < self._max_txid:
                self._hwm = None  # a gap: the file may fill it and make the files past it reachable
            elif entry.is_snapshot and entry.max_txid > hwm:
                self._hwm, self._tip = entry.max_txid, {entry.post}
            elif p == hwm and entry.max_txid > hwm:
                if any(continues(c, entry.pre) for c in self._tip):
                    self._hwm, self._tip = entry.max_txid, {entry.post}  # the usual case: it continues the chain
                # else it applies on another history than the one stored there: the HWM stays
            elif p < hwm and not (entry.max_txid == hwm and entry.post in self._tip):
                # A compaction's output, or an upload overlapping stored files: whether it is reachable (a chain
                # point it starts at has its state) and what it reaches takes a walk (once per compaction).
                self._hwm = None
            # else it starts past the end of the chain: a gap opens, and the HWM stays where the chain ends
        self._max_txid = max(self._max_txid, entry.max_txid)
        self._size += entry.size
        self._len += 1
        self.changes.append(("+", entry))
        self.version = next(_VERSIONS)

    def remove(self, entries: Iterable[FileEntry]) -> None:
        gone = set(entries)
        if not gone:
            return
        for level, files in self.levels.items():
            self.levels[level] = [e for e in files if e not in gone]
            self.changes += [("-", e) for e in files if e in gone]
        self._totals()
        self.version = next(_VERSIONS)

    def newest(self, level: int) -> FileEntry | None:
        """The level's file reaching the highest TXID. Files sort by min_txid, so a snapshot in a level below L9 (an
        import compacted into it, 1..N) sorts first however far it reaches: the newest is the last file or the
        last of the snapshots."""
        files = self.levels.get(level)
        if not files:
            return None
        snaps = bisect.bisect_left(files, (2, 0), key=_order)  # files[:snaps] start at TXID 1, by max_txid
        if snaps and files[snaps - 1].max_txid > files[-1].max_txid:
            return files[snaps - 1]
        return files[-1]

    @property
    def max_txid(self) -> int:
        """The highest TXID of any stored file, restorable or not (see `hwm`)."""
        return self._max_txid

    @property
    def hwm(self) -> int:
        """The high-water mark: the highest TXID a restore reaches (a chain from a snapshot, as `plan_restore` walks
        it); 0 if none. Every TXID at or below it is restorable from the store; past a gap (a file lost or deleted
        by hand) it stays below `max_txid`, since what lies beyond cannot be restored."""
        if self._hwm is None:
            sums = chain(self)[1]
            self._hwm = max(sums, default=0)
            self._tip = sums.get(self._hwm, set())
        return self._hwm

    def gap(self) -> tuple[int, int] | None:
        """The first TXIDs missing from the chain (first, last), with stored files past them; None when a restore
        reaches every file. When no TXID is missing but the files past the chain apply on another state than the
        one stored (another history, past a lost file), `last` is `first - 1`."""
        hwm = self.hwm
        if hwm >= self._max_txid:
            return None
        return hwm + 1, max(hwm, min(e.min_txid for e in self if e.max_txid > hwm) - 1)

    def restorable_head(self) -> FileEntry | None:
        """The file ending at the newest state a restore can reach (a chain from a snapshot), at its finest
        level; None if no chain reaches anything. Its post checksum is the stored position."""
        best: FileEntry | None = None
        for e in chain(self)[0]:
            if best is None or e.max_txid > best.max_txid or (e.max_txid == best.max_txid and e.level < best.level):
                best = e
        return best

    def head(self) -> FileEntry | None:
        """The file holding the newest TXID (its post checksum is the stored position)."""
        best: FileEntry | None = None
        for e in self:
            if best is None or e.max_txid > best.max_txid or (
                    e.max_txid == best.max_txid and e.level < best.level):
                best = e
        return best

    @property
    def size(self) -> int:
        return self._size

    def to_json(self, generation: str = "") -> str:
        """Version 2: each file as the list of its fields, in FileEntry's order (version 1, a dict per file, was
        ten times slower to write for a day's index and is still read)."""
        return json.dumps({"version": 2, "generation": generation, "files": [astuple(e) for e in self]},
                          separators=(",", ":"))

    def copy(self) -> DbIndex:
        return DbIndex(self)

    @classmethod
    def load(cls, path: Path) -> DbIndex | None:
        """The index cached at `path`, with the journal beside it applied (see `IndexCache`); None if missing or
        damaged (then it is rebuilt from the store)."""
        try:
            data = json.loads(path.read_text())
            if data.get("version") == 2:
                entries = [FileEntry(*e) for e in data["files"]]
            else:
                entries = [FileEntry(**e) for e in data["files"]]
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError, AttributeError):
            return None  # a damaged index is rebuilt from the store
        files = dict.fromkeys(entries)  # in order, one of each: the journal adds and removes in O(1)
        _replay(files, path.with_name(path.name + ".log"), data.get("generation", ""))
        return cls(files)


def _replay(files: dict[FileEntry, None], journal: Path, generation: str) -> None:
    """Apply the journal's whole lines of `generation` to `files`."""
    try:
        lines = journal.read_text().splitlines()
    except (FileNotFoundError, UnicodeDecodeError):
        return
    try:
        if not generation or not lines or json.loads(lines[0]).get("generation") != generation:
            return  # the journal of another index.json (a crash between the two writes): the reconcile at
            # start finds what the cache misses
    except (ValueError, AttributeError):
        return
    for line in lines[1:]:
        try:
            op, *fields = json.loads(line)
            entry = FileEntry(*fields)
        except (ValueError, TypeError):
            return  # a line cut short by a crash: the rest is for the reconcile
        if op == "+":
            files.setdefault(entry)
        elif op == "-":
            files.pop(entry, None)


JOURNAL_MIN = 256  # journal lines before index.json is rewritten (or as many as the index has files, if more)


class IndexCache:
    """One database's index in the state directory: `index.json`, and `index.json.log`, a journal of the files
    added and removed since, one JSON line each. A flush appends a line instead of rewriting the whole index (a
    day's index is 8,640 files and 400 KB); once the journal holds as many lines as the index has files, the
    index is written whole again. Neither is fsynced: it is a cache, which the reconcile at every start checks
    against the store. The journal's first line names the `generation` of the index.json it continues."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.journal = path.with_name(path.name + ".log")
        self._base: DbIndex | None = None  # the index object index.json was written from
        self._lines = 0
        self._generation = ""

    def plan(self, index: DbIndex) -> Callable[[], None]:
        """Take the index's changes now (in the event loop) and return the file I/O that saves them (for a thread).
        If that I/O fails, the next save writes the index whole."""
        changes, index.changes = index.changes, []
        if self._base is not index or self._lines + len(changes) > max(JOURNAL_MIN, len(index)):
            generation = secrets.token_hex(8)
            text = index.to_json(generation)
            self._base, self._lines, self._generation = None, 0, generation

            def whole() -> None:
                write_atomically(self.path, text, durable=False)
                self.journal.unlink(missing_ok=True)
                self._base = index
            return whole
        if not changes:
            return lambda: None
        head = json.dumps({"generation": self._generation}) + "\n" if self._lines == 0 else ""
        text = head + "".join(json.dumps([op, *astuple(e)], separators=(",", ":")) + "\n" for op, e in changes)
        self._lines += len(changes)

        def append() -> None:
            try:
                with open(self.journal, "a") as f:
                    f.write(text)
            except BaseException:
                self._base = None
                raise
        return append


async def scan(storage: Storage, prefix: str, objects: Sequence[ObjectInfo] | None = None, *,
               concurrency: int = 32, on_bad: Callable[[str, LTXError], None] | None = None) -> DbIndex:
    """Rebuild one database's index from the store: one LIST (unless `objects` is a listing already made),
    then every file's header (100 bytes). A file whose header is unreadable raises, or with `on_bad` is reported
    to it (key, error) and left out of the index: no plan ever uses it. A file deleted between the LIST and its
    header read is left out."""
    base = prefix.strip("/")
    if objects is None:
        objects = await storage.list(base + "/" if base else "")
    found = []
    for obj in objects:
        parsed = storage.layout.parse(obj.key)
        if parsed is None or parsed.prefix != base:
            continue
        found.append((obj, parsed))
    sem = asyncio.Semaphore(concurrency)

    async def read(obj: ObjectInfo, parsed: LTXKey) -> FileEntry | None:
        async with sem:
            try:
                head = await storage.get_range(obj.key, 0, HEADER_SIZE)
            except NotFound:
                return None  # deleted since the LIST (retention, compaction): the index is of what is stored
        try:
            header = Header.unpack(head)
            if (header.min_txid, header.max_txid) != (parsed.min_txid, parsed.max_txid):
                # Every reader finds a file by its name (Litestream too): a header of another range is a bad file.
                raise InvalidHeader(f"header covers TXIDs {header.min_txid:016x}-{header.max_txid:016x}, not the "
                                    f"{parsed.min_txid:016x}-{parsed.max_txid:016x} its name says", field="min_txid")
        except LTXError as err:
            if on_bad is None:
                raise LTXError(f"{obj.key}: {err}", field=err.field) from err
            on_bad(obj.key, err)
            return None
        return FileEntry.from_header(parsed.level, header, obj.size)

    entries = await asyncio.gather(*(read(obj, parsed) for obj, parsed in found))
    return DbIndex(e for e in entries if e is not None)


def restore_points(index: DbIndex) -> list[tuple[int, int, int]]:
    """(txid, timestamp ms, level) of every state a restore can reach, oldest first.

    A file's end is a restore point when some chain from a snapshot reaches it; at one TXID the
    finest level is reported.
    """
    best: dict[int, tuple[int, int, int]] = {}
    for e in chain(index)[0]:
        if e.max_txid not in best or e.level < best[e.max_txid][2]:
            best[e.max_txid] = (e.max_txid, e.timestamp, e.level)
    return sorted(best.values())


def continues(post: int, pre: int) -> bool:
    """Whether a file with pre-apply checksum `pre` applies on a state with post-apply checksum `post`: they are
    equal, or either is unknown (0: Litestream's files carry no checksums, a snapshot no pre-apply checksum)."""
    return pre == post or not pre or not post


def chain(entries: Iterable[FileEntry]) -> tuple[list[FileEntry], dict[int, set[int]]]:
    """The files some chain from a snapshot reaches, as `plan_restore` chains them, in (min_txid, max_txid) order,
    and the post-apply checksums of the states reached at each TXID a chain ends at.

    A file continues the chain point min_txid - 1 when it applies on a state reached there (`continues`: a file
    of another history, past a lost file, does not), and a file starting inside a reachable file (no chain ends
    at min_txid - 1) when a chain ends in [min_txid, max_txid - 1]: it overlaps what precedes it (a snapshot taken
    while L1 lagged ends inside the next L1 file). Taken in min_txid order, every chain ending at or past
    min_txid - 1 below max_txid is known already: the chain reaching it first crosses min_txid - 1 through a file
    with a smaller min_txid."""
    known: list[int] = []  # TXIDs at which a chain ends, sorted
    sums: dict[int, set[int]] = {}  # TXID -> post-apply checksums of the states chains reach there
    files: list[FileEntry] = []
    for e in sorted(entries, key=_order):
        p = e.min_txid - 1
        i = bisect.bisect_left(known, p)
        if e.is_snapshot:
            ok = True
        elif i < len(known) and known[i] == p:
            ok = any(continues(post, e.pre) for post in sums[p])
        else:
            ok = i < len(known) and known[i] < e.max_txid
        if ok:
            files.append(e)
            if e.max_txid not in sums:
                bisect.insort(known, e.max_txid)
                sums[e.max_txid] = set()
            sums[e.max_txid].add(e.post)
    return files, sums


def reachable(index: DbIndex | Iterable[FileEntry]) -> set[int]:
    """TXIDs at which a chain starting from a snapshot ends (see `chain`)."""
    return set(chain(index)[1])


__all__ = ["SNAPSHOT_LEVEL", "DbIndex", "FileEntry", "chain", "continues", "reachable", "restore_points", "scan"]
