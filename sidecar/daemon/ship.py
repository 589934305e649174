"""One database's shipping: decide what upstream needs next, build it, send it, learn the HWM.

Upstream and the node usually count TXIDs alike. After upstream wins a divergence (an operator restore), the
node imports upstream's state as its own next transaction, and from then on upstream TXID = local TXID +
`offset`. The link (offset, and an import waiting to be shipped) is kept in the state directory, so a
restart continues the same history.

    upstream empty                          ship files 1..k if the node still has them, else an export snapshot
    upstream = a local position             ship the next local files (≤ 4,096, ≤ 32 MiB), compacted
    upstream behind, next file gone         ship the node's current state (export) as one transaction
    upstream ahead, or other checksum       never overwrite it: import upstream's state on the primary, ship on
                                            from upstream's head
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from sidecar.daemon.build import compact_files, encode_state, import_checksums, snapshot_to_db
from sidecar.daemon.litefs import LiteFSError, LiteFSNode
from sidecar.daemon.local import LocalDB, LocalFile
from sidecar.daemon.upstream import Upstream
from sidecar.errors import PosMismatch, SidecarError
from sidecar.ltx import LTXError, Pos
from sidecar.ltx.sqlite import database_checksum_of
from sidecar.ltx.types import format_txid

# An upload's input bytes, at most (a first file larger than this goes alone). A second of a busy database is far
# less (5,000 tx/s of small transactions: 17 MB); a backlog after an outage is cut into uploads this size, so that
# building one never holds more than this of local files (a big file is mapped, not read).
MAX_UPLOAD_INPUT = 32 << 20


class Diverged(SidecarError):
    """Upstream holds a history the node does not; shipping this database stops until it is resolved."""

    code = "EDIVERGED"


class _Stale(Exception):
    """The decision needs a fresh directory listing."""


@dataclass
class Link:
    """How this database's local TXIDs map onto upstream's; persisted."""

    offset: int = 0  # upstream TXID = local TXID + offset
    rebase: int = 0  # local TXID of an imported full-state transaction to ship onto `onto`
    onto: tuple[int, int] | None = None
    # An import of `onto`'s state was sent to the node at this local TXID: LiteFS may have applied it though its
    # answer never came (or the sidecar died before recording it). The import is looked for above it before
    # importing again, which would discard what was written on top of the first.
    importing: int | None = None

    @classmethod
    def load(cls, path: Path) -> Link:
        try:
            doc = json.loads(path.read_text())
            importing = doc.get("importing")
            return cls(int(doc["offset"]), int(doc["rebase"]), tuple(doc["onto"]) if doc["onto"] else None,
                       None if importing is None else int(importing))
        except FileNotFoundError:
            return cls()
        except (ValueError, KeyError, TypeError) as err:
            raise SidecarError(f"{path}: unreadable sidecar state ({err}); remove it to start over") from err

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w") as f:
            json.dump(asdict(self), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


@dataclass(frozen=True, slots=True)
class Shipped:
    """One accepted upload."""

    kind: str  # "files", "snapshot", "export", "import"
    min_txid: int
    max_txid: int
    files: int
    bytes: int
    hwm: int
    oldest: float  # mtime of the oldest local file shipped (ship lag), or 0


@dataclass
class DbShipper:
    """The shipping state of one database; `step()` sends at most one upload."""

    name: str
    local: LocalDB
    upstream: Upstream
    node: LiteFSNode | None
    state_path: Path
    max_files: int = 4096
    max_bytes: int = MAX_UPLOAD_INPUT
    remote: Pos | None = None  # upstream's position, None when it must be re-read
    hwm: int | None = None  # upstream's HWM in upstream TXIDs; None until upstream reports one
    link: Link = field(default_factory=Link)
    error: str = ""

    def __post_init__(self) -> None:
        self.link = Link.load(self.state_path)

    @property
    def local_hwm(self) -> int | None:
        """The HWM in local TXIDs: every local file at or below it is durable upstream. Never above upstream's
        position when that is known: a store rolled back or emptied no longer holds what it once called durable."""
        if self.hwm is None:
            return None
        hwm = self.hwm if self.remote is None else min(self.hwm, self.remote.txid)
        return hwm - self.link.offset

    def relink(self, offset: int) -> None:
        """Upstream TXID = local TXID + `offset` (as a replica learns it by checksum): kept in the state directory, so
        this node's sidecar, restarted once the node is promoted, ships on from upstream's head instead of taking
        the node's TXIDs for upstream's (and importing upstream's state over what upstream lacks)."""
        if offset != self.link.offset:
            self._save(replace(self.link, offset=offset))

    def behind(self) -> bool:
        """Whether the node has transactions upstream lacks (as far as we know)."""
        head = self.local.head
        if head is None:
            return False
        return self.remote is None or head.max_txid + self.link.offset > self.remote.txid or \
            bool(self.link.rebase)

    async def step(self) -> Shipped | None:
        """Ship what upstream needs next; None when in sync. Raises UpstreamError, Diverged, LiteFSError."""
        try:
            return await self._step(fresh=False)
        except _Stale:
            self.local.scan()  # the watcher's view may lag; drastic paths are only taken on a fresh listing
            return await self._step(fresh=True)

    async def _step(self, fresh: bool) -> Shipped | None:
        head = self.local.head
        if head is None or self.remote is None:
            return None
        remote, link = self.remote, self.link
        if link.rebase and link.onto == (remote.txid, remote.post_apply_checksum):
            chain = self.local.chain_from(link.rebase, self.max_files, self.max_bytes)
            if chain:
                return await self._ship(chain, "import", renumber=True)
            raise Diverged(f"{self.name}: the imported transaction {format_txid(link.rebase)} is gone from "
                           f"{self.local.dir}")
        if link.rebase:  # upstream moved again since the import: judge afresh
            self._save(Link(link.offset))
        if remote.is_zero:
            if link.offset:
                self._save(Link())
            chain = self.local.chain_from(1, self.max_files, self.max_bytes)
            if chain:
                try:
                    return await self._ship(chain, "snapshot")
                except LTXError:
                    if not all(self.local.good(f) for f in chain):
                        raise
                    # TXID 1 holds only the pages its transaction wrote: not a snapshot; export instead.
            return await self._ship_export(remote, fresh)
        r_local = remote.txid - self.link.offset
        if r_local > head.max_txid:
            return await self._recover(fresh, f"upstream is ahead at {format_txid(remote.txid)}")
        at = self.local.get(r_local)
        if at is not None and self.local.good(at) and \
                self.local.read_header(at)[1].post_apply_checksum != remote.post_apply_checksum:
            return await self._recover(fresh, f"upstream has checksum {remote.post_apply_checksum:016x} at TXID "
                                       f"{format_txid(remote.txid)}, the node has {at.post:016x}")
        if r_local == head.max_txid:
            return None
        chain = self.local.chain_from(r_local + 1, self.max_files, self.max_bytes)
        if chain:
            if self.local.read_header(chain[0])[0].pre_apply_checksum != remote.post_apply_checksum:
                return await self._recover(fresh, f"the next local transaction {format_txid(chain[0].min_txid)} "
                                                  f"does not continue upstream's checksum "
                                                  f"{remote.post_apply_checksum:016x}")
            return await self._ship(chain, "files")
        # (packed files are not looked at: they are below the HWM, so never above upstream's position)
        snap = [f for f in self.local.files.values() if f.min_txid == 1 and f.max_txid > r_local and self.local.good(f)]
        if snap:  # LiteFS replaced ltx/ with a snapshot (a restore, or a replica promoted)
            chain = self.local.chain_from(1, self.max_files, self.max_bytes)
            if chain:
                return await self._ship(chain, "snapshot", renumber=True)
        bad = self.local.verify_above(r_local)
        if bad:  # a foreign or broken file past upstream's position: skip it, judge afresh next time
            raise LTXError(f"{bad[0][0].path}: {bad[0][1]}")
        return await self._ship_export(remote, fresh)

    async def _ship(self, chain: list[LocalFile], kind: str, *, renumber: bool = False) -> Shipped:
        remote = self.remote or Pos()
        off = self.link.offset
        try:
            paths, lz4 = [f.fspath for f in chain], self.upstream.compress
            if renumber:
                body, header, post = await asyncio.to_thread(
                    compact_files, paths, min_txid=remote.txid + 1, max_txid=chain[-1].max_txid + off,
                    pre=remote.post_apply_checksum, compress=lz4)
            elif off:
                body, header, post = await asyncio.to_thread(
                    compact_files, paths, min_txid=chain[0].min_txid + off, max_txid=chain[-1].max_txid + off,
                    compress=lz4)
            else:
                body, header, post = await asyncio.to_thread(compact_files, paths, compress=lz4)
        except (LTXError, OSError) as err:
            self._find_bad(chain, err)
            raise
        hwm = await self._upload(body, header.max_txid)
        if kind == "import":
            self._save(Link(off))
        self.remote = Pos(header.max_txid, post)
        return Shipped(kind, header.min_txid, header.max_txid, len(chain), len(body), hwm,
                       min(f.mtime for f in chain))

    async def _ship_export(self, remote: Pos, fresh: bool) -> Shipped:
        """Ship the node's current state as one transaction onto `remote` (a snapshot when it is zero)."""
        if not fresh:
            raise _Stale
        if self.node is None:
            raise LiteFSError(f"{self.name}: upstream needs the database's current state (the LTX files after "
                              f"{format_txid(remote.txid - self.link.offset)} are gone), and no LiteFS API is "
                              f"configured to export it")
        db, before, after = await self.node.export(self.name)
        pos = await asyncio.to_thread(self._exported_at, db, before, after)
        if pos.txid + self.link.offset <= remote.txid:
            raise Diverged(f"{self.name}: exported state at {format_txid(pos.txid)} is not ahead of upstream "
                           f"{format_txid(remote.txid)}")
        body, post = await asyncio.to_thread(encode_state, db, onto=remote, max_txid=pos.txid + self.link.offset,
                                             timestamp=int(time.time() * 1000))
        if post != pos.post_apply_checksum:
            raise LiteFSError(f"{self.name}: export checksum {post:016x} differs from {self.node.mount_dir}/"
                              f"{self.name}-pos {pos.post_apply_checksum:016x}")
        hwm = await self._upload(body, pos.txid + self.link.offset)
        self.remote = Pos(pos.txid + self.link.offset, post)
        return Shipped("export" if remote.txid else "snapshot", remote.txid + 1, self.remote.txid, 0, len(body),
                       hwm, 0.0)

    def _exported_at(self, db: bytes, before: Pos, after: Pos) -> Pos:
        """The position an export is at: the one, from `before` to `after` (`<db>-pos` read around it), whose
        post-apply checksum is the copy's (writes may land while the copy travels)."""
        post, _ = database_checksum_of(io.BytesIO(db))
        for pos in (before, after):
            if pos.post_apply_checksum == post:
                return pos
        for f in self.local.above(before.txid):
            if f.max_txid >= after.txid:
                break
            if self.local.good(f) and self.local.read_header(f)[1].post_apply_checksum == post:
                return Pos(f.max_txid, post)
        raise LiteFSError(f"{self.name}: the export's checksum {post:016x} is at no TXID from {before} to {after} "
                          f"in {self.local.dir}")

    async def _upload(self, body: bytes, max_txid: int) -> int:
        """Send one LTX file reaching upstream TXID `max_txid`; returns the HWM, never above `max_txid`: upstream
        cannot hold as durable what it was never sent, and files are pruned under the HWM."""
        try:
            hwm = await self.upstream.upload(self.name, body)
        except PosMismatch as err:
            self.remote = None if err.pos.is_zero else err.pos  # judged afresh on the next step
            raise
        self.hwm = hwm = min(hwm, max_txid)
        return hwm

    async def _recover(self, fresh: bool, why: str) -> Shipped:
        """Upstream wins: bring the primary to upstream's state through `POST /import`, then ship the import."""
        if not fresh:
            raise _Stale
        if self.node is None:
            raise Diverged(f"{self.name}: {why}; no LiteFS API is configured to bring the node to upstream's state")
        snap = await self.upstream.snapshot(self.name)
        db, onto = await asyncio.to_thread(snapshot_to_db, snap)
        expect = await asyncio.to_thread(import_checksums, db)
        target = (onto.txid, onto.post_apply_checksum)
        if self.link.importing is not None and self.link.onto == target and \
                (done := self._imported(self.link.importing, expect)) is not None:
            return await self._imported_at(done, onto)
        before = self.node.pos(self.name) or Pos()
        since = self.link.importing if self.link.onto == target and self.link.importing is not None else before.txid
        self._save(Link(self.link.offset, 0, target, since))
        await self.node.import_db(self.name, db)
        # The import is the node's next transaction; find it by checksum (writes may land around it).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            self.local.scan()
            if (done := self._imported(since, expect)) is not None:
                return await self._imported_at(done, onto)
            await asyncio.sleep(0.05)
        raise Diverged(f"{self.name}: {why}; imported upstream's state but its transaction did not appear in "
                       f"{self.local.dir}")

    def _imported(self, since: int, expect: set[int]) -> LocalFile | None:
        """The node's transaction that imported upstream's state (post-apply checksum in `expect`), above `since`."""
        for f in self.local.above(since):
            if f.min_txid == f.max_txid and f.post in expect:
                return f
        return None

    async def _imported_at(self, f: LocalFile, onto: Pos) -> Shipped:
        """Ship the import `f` onto upstream's head `onto`, and what follows it."""
        self._save(Link(onto.txid + 1 - f.max_txid, f.max_txid, (onto.txid, onto.post_apply_checksum)))
        self.remote = onto
        return await self.step() or Shipped("import", 0, 0, 0, 0, self.hwm or 0, 0.0)

    def _find_bad(self, chain: list[LocalFile], err: Exception) -> None:
        for f in chain:
            if self.local.check(f) is not None:
                return
        # No single file is broken: the chain itself is (a checksum break between files).

    def _save(self, link: Link) -> None:
        self.link = link
        link.save(self.state_path)


__all__ = ["DbShipper", "Diverged", "Link", "Shipped"]
