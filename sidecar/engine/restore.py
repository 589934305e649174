"""Point-in-time restore: a pure planner, and a streaming merge of the plan into a SQLite file.

`plan_restore` picks the latest snapshot at or before the target, then repeatedly the file that reaches
furthest without passing the target (which takes hourly files, then 5-minute files, then L0 flushes for
the tail): the fewest files that rebuild the state. `restore` merges them into `<out>.tmp` (merge.py: the
newest file holding a page wins, every file checksum is verified, on every core for a large restore),
checks the database checksum against the last file's when it has one, fsyncs once and renames. Nothing is
left at `out` unless every check passed.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sidecar.engine.index import DbIndex, FileEntry, chain, continues
from sidecar.engine.merge import Progress, merge
from sidecar.errors import RestoreError
from sidecar.fsutil import fsync_dir
from sidecar.ltx import format_timestamp
from sidecar.storage.base import Storage


@dataclass(frozen=True, slots=True)
class RestoreResult:
    """What a restore produced: the TXID and time it actually restored, and the database checksum."""

    txid: int
    timestamp: int
    checksum: int
    pages: int
    page_size: int
    files: int
    verified: bool  # the checksum was compared with one stored in the backup


def describe(e: FileEntry) -> str:
    return f"{e.max_txid:016x} at {format_timestamp(e.timestamp)} (L{e.level})"


def plan_restore(index: DbIndex | Sequence[FileEntry], *, txid: int | None = None,
                 timestamp: int | None = None) -> list[FileEntry]:
    """The files to merge, in order, to rebuild the state at `txid`, at `timestamp` (ms), or the latest.

    Raises RestoreError (naming the oldest and newest restore points) when the target is before every
    snapshot, when a TXID target is not a restore point, or when a gap breaks the chain.
    """
    if txid is not None and timestamp is not None:
        raise RestoreError("give a TXID or a timestamp, not both")
    entries = list(index)

    def fits(e: FileEntry) -> bool:
        return (txid is None or e.max_txid <= txid) and (timestamp is None or e.timestamp <= timestamp)

    if not entries:
        raise RestoreError("no backup files found")
    snapshots = [e for e in entries if e.is_snapshot and fits(e)]
    if not snapshots:
        oldest = min((e for e in entries if e.is_snapshot), key=lambda e: e.max_txid, default=None)
        where = f"; the oldest restore point is {describe(oldest)}" if oldest else "; the backup has no snapshot"
        target = f"TXID {txid:016x}" if txid is not None else f"{format_timestamp(timestamp or 0)}"
        raise RestoreError(f"target {target} is before every snapshot{where}")
    plan = [max(snapshots, key=lambda e: (e.max_txid, e.level, -e.timestamp))]
    cur = plan[0].max_txid
    ends = {cur: plan[0].post}  # TXID -> post-apply checksum, where each file of the plan ends

    def continues_plan(e: FileEntry) -> bool:
        """`e` takes the plan past `cur`: it starts within it, and applies on the state the plan has there when
        the plan has one at e.min_txid - 1 (a file of another history, past a lost file, does not)."""
        p = e.min_txid - 1
        return e.min_txid <= cur + 1 and e.max_txid > cur and (p not in ends or continues(ends[p], e.pre))

    while txid is None or cur < txid:
        eligible = [e for e in entries if continues_plan(e) and fits(e)]
        if not eligible:
            break
        best = max(eligible, key=lambda e: (e.max_txid, -e.min_txid, e.level))
        plan.append(best)
        cur = best.max_txid
        ends[cur] = best.post
    if txid is not None and cur != txid:
        raise RestoreError(_missed(entries, txid, plan[-1], any(map(continues_plan, entries))))
    beyond = [e for e in entries if fits(e) and e.max_txid > cur]
    # A file after the target time that continues the chain (an L1 file whose first flushes L0 retention
    # deleted) means no TXID is missing: the target lies between two restore points, and `cur` is the earlier.
    if beyond and not any(map(continues_plan, entries)):
        raise RestoreError(_gap(entries, plan[-1]))
    return plan


def _gap(entries: Sequence[FileEntry], last: FileEntry) -> str:
    """The chain stops at `last` although later files exist: name the missing TXIDs, or the file that applies on
    another state than the one the chain reaches (another history, past a lost file)."""
    cur = last.max_txid
    stray = [e for e in entries if e.min_txid <= cur + 1 and e.max_txid > cur]
    if stray:
        e = min(stray, key=lambda e: (e.min_txid, e.max_txid, e.level))
        return (f"the backup's chain stops at {describe(last)}: L{e.level} {e.min_txid:016x}-{e.max_txid:016x} after "
                f"it applies on another state (pre-apply checksum {e.pre:016x}; another history)")
    resume = min(e.min_txid for e in entries if e.min_txid > cur + 1)
    return f"the backup has a gap: TXIDs {cur + 1:016x}..{resume - 1:016x} are missing after {describe(last)}"


def _missed(entries: Sequence[FileEntry], txid: int, below: FileEntry, goes_on: bool) -> str:
    """Why no plan ends exactly at `txid`; `below` is the nearest restore point under it, and `goes_on` whether a
    file continues the chain past it.

    Past every file: beyond the newest restore point. Nothing continues the chain after `below`: a gap (a
    file is missing, or of another history). Otherwise a file spans `txid`: it is not a restore point, and the
    nearest above is named too.
    """
    points = _points(entries)
    if txid > max(e.max_txid for e in entries):
        newest = points[max(points)]
        out = f"TXID {txid:016x} is beyond the newest restore point {describe(newest)}"
        return out + (f"; {_gap(entries, newest)}" if any(e.max_txid > newest.max_txid for e in entries) else "")
    if not goes_on:
        return f"TXID {txid:016x} cannot be restored: {_gap(entries, below)}"
    above = points[min(t for t in points if t > txid)]
    return (f"TXID {txid:016x} is not a restore point; the nearest are {describe(below)} below and "
            f"{describe(above)} above (see `litefs-sidecar ls`)")


def _points(entries: Sequence[FileEntry]) -> dict[int, FileEntry]:
    """Every TXID a plan can end at, with the finest-level file ending there (chains as `index.chain` walks them)."""
    best: dict[int, FileEntry] = {}
    for e in chain(entries)[0]:
        if e.max_txid not in best or e.level < best[e.max_txid].level:
            best[e.max_txid] = e
    return best


async def restore(storage: Storage, prefix: str, plan: Sequence[FileEntry], out: str | os.PathLike[str], *,
                  integrity_check: bool = False, progress: Progress | None = None,
                  replace: Sequence[Path] = ()) -> RestoreResult:
    """Merge `plan` (from `plan_restore`) into the SQLite file `out`, atomically. `replace`: files removed once the
    result is verified, just before it takes `out`'s name (the old database's -wal and -shm)."""
    if not plan:
        raise RestoreError("empty restore plan")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.restore-tmp")
    keys = [e.key(storage.layout, prefix) for e in plan]
    with tempfile.TemporaryDirectory(prefix=".restore-", dir=out.parent) as tmpdir:
        paths = await storage.local_files(keys, Path(tmpdir))
        try:
            result = await asyncio.to_thread(_merge_into, paths, keys, plan, tmp, progress)
            if integrity_check:
                await asyncio.to_thread(check_integrity, tmp)
            for side in replace:
                side.unlink(missing_ok=True)
            await asyncio.to_thread(_publish, tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return result


def _merge_into(paths: Sequence[Path], keys: Sequence[str], plan: Sequence[FileEntry], tmp: Path,
                progress: Progress | None) -> RestoreResult:
    merged = merge(paths, tmp, progress, names=keys)
    last = plan[-1]
    verified = bool(last.post)
    if verified and merged.checksum != last.post:
        raise RestoreError(f"restored database checksum {merged.checksum:016x} != {last.post:016x} stored for "
                           f"TXID {last.max_txid:016x}; nothing was written")
    return RestoreResult(last.max_txid, last.timestamp, merged.checksum, merged.pages, merged.page_size, len(plan),
                         verified)


def _publish(tmp: Path, out: Path) -> None:
    os.replace(tmp, out)
    fsync_dir(out.parent)


def check_integrity(path: Path, what: str = "restored database") -> None:
    """Run `PRAGMA integrity_check`; raise RestoreError with SQLite's first complaint, naming the file as `what`
    (also when SQLite cannot read the file at all)."""
    try:
        con = sqlite3.connect(path)  # read-write: a WAL-mode database needs its -shm even to read
        try:
            rows = con.execute("PRAGMA integrity_check").fetchall()
        finally:
            con.close()
    except sqlite3.DatabaseError as err:
        rows = [(f"SQLite cannot read it: {err}",)]
    for suffix in SIDE_FILES:
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    if rows != [("ok",)]:
        raise RestoreError(f"{what} fails integrity_check: {rows[0][0]}")


SIDE_FILES = ("-wal", "-shm", "-journal")  # what SQLite keeps beside a database, and would apply to a new one


def side_files(out: Path) -> list[Path]:
    """The `-wal`, `-shm` and `-journal` files beside `out` (SQLite would apply a stale WAL to a restored file)."""
    return [side for suffix in SIDE_FILES if (side := Path(f"{out}{suffix}")).exists()]


__all__ = ["SIDE_FILES", "RestoreResult", "check_integrity", "plan_restore", "restore", "side_files"]
