"""The index of restore points: every stored LTX file of one database, by level.

The engine keeps it in memory and in a small JSON file in its state directory, so listing and planning
cost no LIST or HEAD request; `scan` rebuilds it from the store (one LIST, one 100-byte ranged GET per
file for the header) when the file is lost, and reads Litestream replicas the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sidecar.fsutil import write_atomically
from sidecar.ltx import HEADER_SIZE, Header, LTXError
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.layout import SNAPSHOT_LEVEL, Layout


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


class DbIndex:
    """The files of one database, per level, sorted by TXID."""

    def __init__(self, entries: Iterable[FileEntry] = ()) -> None:
        self.levels: dict[int, list[FileEntry]] = {}
        for e in entries:
            self.levels.setdefault(e.level, []).append(e)
        for files in self.levels.values():
            files.sort(key=lambda e: (e.min_txid, e.max_txid))

    def __iter__(self) -> Iterator[FileEntry]:
        for level in sorted(self.levels):
            yield from self.levels[level]

    def __len__(self) -> int:
        return sum(len(v) for v in self.levels.values())

    def level(self, level: int) -> list[FileEntry]:
        return self.levels.get(level, [])

    def add(self, entry: FileEntry) -> None:
        files = self.levels.setdefault(entry.level, [])
        files.append(entry)
        files.sort(key=lambda e: (e.min_txid, e.max_txid))

    def remove(self, entries: Iterable[FileEntry]) -> None:
        gone = set(entries)
        for level, files in self.levels.items():
            self.levels[level] = [e for e in files if e not in gone]

    def newest(self, level: int) -> FileEntry | None:
        files = self.levels.get(level)
        return files[-1] if files else None

    @property
    def max_txid(self) -> int:
        return max((e.max_txid for e in self), default=0)

    def restorable_head(self) -> FileEntry | None:
        """The file ending at the newest state a restore can reach (a chain from a snapshot), at its finest
        level; None if no chain reaches anything. Its post checksum is the stored position."""
        reach = reachable(self)
        best: FileEntry | None = None
        for e in self:
            if e.max_txid in reach and (best is None or e.max_txid > best.max_txid or (
                    e.max_txid == best.max_txid and e.level < best.level)):
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
        return sum(e.size for e in self)

    def to_json(self) -> str:
        return json.dumps({"version": 1, "files": [asdict(e) for e in self]}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> DbIndex:
        data = json.loads(text)
        return cls(FileEntry(**e) for e in data["files"])

    def save(self, path: Path) -> None:
        write_atomically(path, self.to_json())

    def copy(self) -> DbIndex:
        return DbIndex(self)

    @classmethod
    def load(cls, path: Path) -> DbIndex | None:
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # a damaged index is rebuilt from the store


async def scan(storage: Storage, prefix: str, objects: Sequence[ObjectInfo] | None = None, *,
               concurrency: int = 32, on_bad: Callable[[str, LTXError], None] | None = None) -> DbIndex:
    """Rebuild one database's index from the store: one LIST (unless `objects` is a listing already made),
    then every file's header (100 bytes). A file whose header is unreadable raises, or with `on_bad` is reported
    to it (key, error) and left out of the index: no plan ever uses it."""
    base = prefix.strip("/")
    if objects is None:
        objects = await storage.list(base + "/" if base else "")
    found = []
    for obj in objects:
        parsed = storage.layout.parse(obj.key)
        if parsed is None or parsed.prefix != base:
            continue
        found.append((obj, parsed.level))
    sem = asyncio.Semaphore(concurrency)

    async def read(obj: ObjectInfo, level: int) -> FileEntry | None:
        async with sem:
            head = await storage.get_range(obj.key, 0, HEADER_SIZE)
        try:
            header = Header.unpack(head)
        except LTXError as err:
            if on_bad is None:
                raise LTXError(f"{obj.key}: {err}", field=err.field) from err
            on_bad(obj.key, err)
            return None
        return FileEntry.from_header(level, header, obj.size)

    entries = await asyncio.gather(*(read(obj, level) for obj, level in found))
    return DbIndex(e for e in entries if e is not None)


def restore_points(index: DbIndex) -> list[tuple[int, int, int]]:
    """(txid, timestamp ms, level) of every state a restore can reach, oldest first.

    A file's end is a restore point when some chain from a snapshot reaches it; at one TXID the
    finest level is reported.
    """
    reach = reachable(index)
    best: dict[int, tuple[int, int, int]] = {}
    for e in index:
        if e.max_txid in reach and (e.max_txid not in best or e.level < best[e.max_txid][2]):
            best[e.max_txid] = (e.max_txid, e.timestamp, e.level)
    return sorted(best.values())


def reachable(index: DbIndex) -> set[int]:
    """TXIDs at which a contiguous chain starting from a snapshot ends."""
    ends = {e.max_txid for e in index if e.is_snapshot}
    starts: dict[int, list[FileEntry]] = {}
    for e in index:
        if not e.is_snapshot:
            starts.setdefault(e.min_txid, []).append(e)
    todo = sorted(ends)
    while todo:
        t = todo.pop()
        for e in starts.get(t + 1, ()):
            if e.max_txid not in ends:
                ends.add(e.max_txid)
                todo.append(e.max_txid)
    return ends


__all__ = ["SNAPSHOT_LEVEL", "DbIndex", "FileEntry", "reachable", "restore_points", "scan"]
