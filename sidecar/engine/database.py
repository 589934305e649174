"""What the engine knows about one database, and the status copies it hands out.

A `Database` is engine-private: its locks and lists are read and changed only by the engine's own modules
(accept, flush, compaction, retention, operations). Everything outside gets a frozen `DbStatus`.

Locks, always taken in this order when more than one is needed:

    lock       uploads (the position changes only under it), and whatever needs no upload meanwhile
    flushing   one flush at a time; uploads go on meanwhile (they only append to `pending`)
    maint      compaction, retention and restores: the files they read stay put
    saving     index.json writes, in turn
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from sidecar.engine.index import DbIndex
from sidecar.engine.pagesums import PageSums
from sidecar.ltx import Header, Pos
from sidecar.retry import Backoff

log = structlog.get_logger("sidecar.engine")


@dataclass
class Pending:
    """An accepted upload, durable in the upload log, waiting (in memory) for the next flush."""

    header: Header
    post: int
    arrived: float
    segment: int  # of the upload log, released once flushed
    data: bytes


@dataclass
class JobHealth:
    """One job of one database (flush, L1, retention, …): its failures in a row and when it may run again."""

    backoff: Backoff = field(default_factory=lambda: Backoff(base=1.0, cap=60.0))
    failures: int = 0  # in all, since start (for /metrics)
    last_error: str = ""


@dataclass
class Database:
    """Everything the engine knows about one database."""

    cluster: str
    name: str
    dir: Path
    index: DbIndex
    pending: list[Pending] = field(default_factory=list)
    pos: Pos = field(default_factory=Pos)
    page_size: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    flushing: asyncio.Lock = field(default_factory=asyncio.Lock)
    maint: asyncio.Lock = field(default_factory=asyncio.Lock)
    saving: asyncio.Lock = field(default_factory=asyncio.Lock)
    uploading: int = 0  # uploads being validated or written right now
    last_run: dict[int, float] = field(default_factory=dict)  # level -> when last compacted
    last_upload: float = 0.0
    jobs: dict[str, JobHealth] = field(default_factory=dict)
    resync: bool = False  # the store contradicted the index: rebuild it before anything else
    sums: PageSums | None = None  # each page's checksum at `pos`; None while unknown (rebuilt from the store)
    deleted: bool = False  # deleted by an operator: an upload that waited for it is refused
    # Copies of its files set aside in the store (engine/flush.py), key -> when (epoch ms): learned as they are made
    # and from one listing at start, so retention deletes them when they expire without listing anything.
    set_aside: dict[str, int] = field(default_factory=dict)
    # (index version, gap) as last told: a gap is logged once when it appears, and once when it is filled
    _gap: tuple[int, str] = field(default=(0, ""), init=False, repr=False)

    @property
    def prefix(self) -> str:
        """The database's prefix in the store: `<cluster>/<db>`."""
        return f"{self.cluster}/{self.name}"

    @property
    def hwm(self) -> int:
        """The highest TXID durable in the store: what a restore reaches. Clients delete their copies at or below it,
        so past a gap in the stored chain it stops before the gap (and the gap is logged). Never past what the client
        has sent and the store holds (the position, before any pending upload but a snapshot): stored files beyond
        it (left past a gap that its upload filled) may be of another history than the client's, which checksums
        cannot tell while the two agree up to there."""
        hwm = self.index.hwm
        if self._gap[0] != self.index.version and (hwm < self.index.max_txid or self._gap[1]):
            self.gap()
        first = self.pending[0].header if self.pending else None
        return min(hwm, first.min_txid - 1 if first and not first.is_snapshot else self.pos.txid)

    def gap(self) -> str:
        """What breaks the stored chain ("" if nothing): logged when it appears, changes or is filled."""
        if self._gap[0] == self.index.version:
            return self._gap[1]
        missing = self.index.gap()
        gap = ""
        if missing and missing[1] < missing[0]:
            first = missing[0]
            gap = (f"the stored files past TXID {first - 1:016x} apply on another state than the one stored there "
                   f"(another history, past a lost file): TXIDs {first:016x}..{self.index.max_txid:016x} cannot be "
                   f"restored, and the HWM stays at {first - 1:016x}")
        elif missing:
            first, last = missing
            where = f"after TXID {first - 1:016x}" if first > 1 else "before any snapshot"
            gap = (f"TXIDs {first:016x}..{last:016x} are missing from the store {where}: TXIDs {last + 1:016x}.."
                   f"{self.index.max_txid:016x} cannot be restored, and the HWM stays at {first - 1:016x}")
        if gap != self._gap[1]:
            if missing:
                # A person must act: the client may still hold the missing TXIDs (it keeps what is above the HWM, and
                # fills the gap if it sends them again); else only a new snapshot makes the newest state restorable.
                log.error("backup has a gap: the HWM stops before it", cluster=self.cluster, db=self.name,
                          missing=f"{missing[0]:016x}-{missing[1]:016x}" if missing[1] >= missing[0] else "",
                          hwm=f"{missing[0] - 1:016x}", stored=f"{self.index.max_txid:016x}", reason=gap)
            else:
                log.info("backup gap filled", cluster=self.cluster, db=self.name, hwm=f"{self.index.hwm:016x}",
                         was=self._gap[1])
        self._gap = (self.index.version, gap)
        return gap

    def job(self, name: str) -> JobHealth:
        return self.jobs.setdefault(name, JobHealth())

    def refresh_pos(self) -> None:
        """The position from the newest pending upload, else the newest state the store can restore (zero if
        none: a client then sends a snapshot)."""
        if self.pending:
            last = self.pending[-1]
            self.pos, self.page_size = Pos(last.header.max_txid, last.post), last.header.page_size
        else:
            head = self.index.restorable_head()
            self.pos = Pos(head.max_txid, head.post) if head else Pos()
            self.page_size = head.page_size if head else 0

    def status(self) -> DbStatus:
        return DbStatus(self.cluster, self.name, self.pos, self.hwm, len(self.pending),
                        sum(len(p.data) for p in self.pending), self.index.size, len(self.index), self.last_upload,
                        self.pending[0].arrived if self.pending else 0.0,
                        {k: (j.failures, j.backoff.failures, j.last_error) for k, j in self.jobs.items()},
                        self.page_size, self.uploading, self.gap(), len(self.set_aside))


@dataclass(frozen=True, slots=True)
class DbStatus:
    """A copy of one database's state: position, HWM, what waits for the store, and how its jobs fare."""

    cluster: str
    name: str
    pos: Pos
    hwm: int
    pending_files: int
    pending_bytes: int
    stored_bytes: int
    files: int
    last_upload: float
    oldest_pending: float  # when the oldest upload not yet in the store arrived (0: none)
    # job -> (failures since start, failures in a row now, last error): a job failing alone shows here
    jobs: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    page_size: int = 0
    uploading: int = 0  # uploads being verified or logged right now
    gap: str = ""  # what breaks the stored chain, which holds the HWM below it ("" if nothing)
    set_aside: int = 0  # copies of its files set aside in the store, kept until the snapshot retention has passed

    @property
    def failing(self) -> dict[str, str]:
        """The jobs failing right now, with their last error; a gap in the stored chain as "chain"."""
        out = {k: err for k, (_, now, err) in self.jobs.items() if now}
        if self.gap:
            out["chain"] = self.gap
        return out


__all__ = ["Database", "DbStatus", "JobHealth", "Pending"]
