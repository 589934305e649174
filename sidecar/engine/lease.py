"""One writer per cluster: leases held in the store itself, taken and renewed with conditional writes.

    .litefs-sidecar/leases/<cluster>      {"owner", "addr", "expires" (ms), "epoch", "host", "run"}

Why per cluster, not per database: a cluster is the unit LiteFS works in (one primary, one backup client, one
`GET /pos` for all its databases), so one owner can answer everything a node asks; and leases cost a PUT each
renewal, which per cluster is a few per minute, not per database.

- Taking a free lease is a PUT with `If-None-Match: *`; taking an expired one, or renewing, a PUT with
  `If-Match: <its ETag>`. Two engines can never both succeed (docs/format.md §5).
- A lease is another's until its `expires` plus the clock-skew margin has passed on the taker's clock.
- The holder counts its lease valid until (when it sent the request that wrote it) + TTL - margin on its own
  monotonic clock, and writes nothing to the store after that (`fence`): with clocks skewed by less than the
  margin, an old holder has stopped writing before a new one can start. Every data object is also written with
  `If-None-Match: *`, so even a writer paused mid-request cannot replace what another wrote.
- Renewed every third of the TTL while the cluster is busy; an idle cluster's lease is let go.
- `owner` is the state directory's id, the same across restarts, so a restart takes its leases back at once
  instead of waiting for them to expire; `run` is the process run's own random token.
- Taking a lease that nobody else has held since this engine started (none yet, or this very run's) keeps this
  engine's cache of the cluster, which it reconciled with the store at start; any other takeover (another owner,
  or this owner's previous run) means the cluster's indexes are rebuilt from the store.
- Two live processes with one owner id (a copied state directory) would take the lease from each other at every
  renewal. A run that loses its lease to another run of its own owner id logs an error, and from then on counts
  that run as another engine: it waits for that run's lease to expire like anyone else's.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

import structlog

from sidecar.errors import NotFound, PreconditionFailed, SidecarError
from sidecar.storage.base import Storage

log = structlog.get_logger("sidecar.engine")

PREFIX = ".litefs-sidecar/leases/"
TTL = 12.0  # seconds: an owner that dies is replaced within TTL + SKEW
SKEW = 2.0  # seconds of clock difference between hosts the leases tolerate
HOST = f"{socket.gethostname()} pid {os.getpid()}"


def lease_key(cluster: str) -> str:
    return PREFIX + cluster


@dataclass(frozen=True, slots=True)
class LeaseDoc:
    """What a lease object holds."""

    owner: str  # the holding engine's id (its state directory's)
    addr: str  # where that engine takes requests ("" for an engine inside a sidecar)
    expires: int  # ms since the epoch, the holder's wall clock
    epoch: int  # +1 at every takeover (a change of owner or of run)
    host: str = ""  # the holder's host name and process, for people reading logs
    run: str = ""  # the holding process run's random token ("" in a lease written by an older version)

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> LeaseDoc:
        try:
            doc = json.loads(data)
            return cls(str(doc["owner"]), str(doc["addr"]), int(doc["expires"]), int(doc["epoch"]),
                       str(doc.get("host", "")), str(doc.get("run", "")))
        except (ValueError, KeyError, TypeError) as err:
            raise SidecarError(f"unreadable lease object ({err})") from err


class NotOwner(SidecarError):
    """Another engine holds the cluster's lease (`holder`), or this engine's lease ran out; try again later."""

    code = "ENOTOWNER"
    http_status = 503
    retry_after = 1

    def __init__(self, cluster: str, holder: LeaseDoc | None, message: str = "") -> None:
        self.cluster = cluster
        self.holder = holder
        if holder is not None:
            who = f"engine {holder.owner} ({holder.host or '?'}{', ' + holder.addr if holder.addr else ''})"
            until = datetime.fromtimestamp(holder.expires / 1000, UTC).strftime("%H:%M:%S")
            message = message or f"cluster {cluster!r} is written by {who}; its lease runs until {until} UTC " \
                                 "unless renewed"
        super().__init__(message or f"cluster {cluster!r} is written by another engine")


@dataclass
class Held:
    doc: LeaseDoc
    etag: str
    written: float  # monotonic seconds when the request that wrote it was sent
    valid_until: float  # monotonic seconds


class Leases:
    """The leases of one engine (`owner`), on the clusters it writes."""

    def __init__(self, storage: Storage, owner: str | None = None, addr: str = "", *, ttl: float = TTL,
                 skew: float = SKEW, clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 3 * skew:
            raise ValueError(f"lease TTL {ttl}s must exceed three times the clock-skew margin {skew}s")
        self.storage = storage
        self.owner = owner or secrets.token_hex(8)
        self.run = secrets.token_hex(8)  # this process run's: several runs may share an owner (restarts, copies)
        self.twins: set[str] = set()  # live runs of this owner id in other processes (copies of its state directory)
        self.addr = addr
        self.ttl = ttl
        self.skew = skew
        self.clock = clock
        self.monotonic = monotonic
        self.held: dict[str, Held] = {}
        self.on_change: Callable[[int], None] | None = None  # called with len(held) when it changes

    def _changed(self, before: int) -> None:
        if self.on_change is not None and len(self.held) != before:
            self.on_change(len(self.held))

    def holds(self, cluster: str) -> bool:
        """Whether this engine may write the cluster now."""
        held = self.held.get(cluster)
        return held is not None and self.monotonic() < held.valid_until

    def due(self, cluster: str) -> bool:
        """Whether a held lease is a third of its TTL old: time to renew it."""
        held = self.held.get(cluster)
        return held is None or self.monotonic() - held.written >= self.ttl / 3

    def fence(self, cluster: str) -> float:
        """Raise NotOwner unless this engine may write the cluster now; return the seconds a write started now may
        take. A write must end within them: the next owner takes the lease `2 × skew` after that, and a request
        still in flight then could land over its files (S3 has no fencing token)."""
        if not self.holds(cluster):
            raise NotOwner(cluster, None, f"cluster {cluster!r}: this engine's lease "
                                          f"{'ran out' if cluster in self.held else 'is not held'}; it writes nothing")
        return self.held[cluster].valid_until - self.monotonic()

    def ours(self, cluster: str) -> bool:
        """Whether this engine held the cluster last, as far as it knows (its lease may have run out unrenewed)."""
        return cluster in self.held

    async def holder(self, cluster: str) -> tuple[LeaseDoc | None, str | None]:
        """The lease object and its ETag; (None, None) if there is none."""
        try:
            got = await self.storage.get_if_changed(lease_key(cluster), None)
        except NotFound:
            return None, None
        assert got is not None
        try:
            return LeaseDoc.decode(got[0]), got[1]
        except SidecarError as err:
            raise SidecarError(f"cluster {cluster!r}: lease object {lease_key(cluster)}: {err}") from None

    def live(self, doc: LeaseDoc | None) -> bool:
        """Whether `doc` is another engine's lease that has not yet expired (with the skew margin). One of this
        owner id is this engine's (a previous run's, taken back at once) unless it is a known twin's."""
        return (doc is not None and (doc.owner != self.owner or doc.run in self.twins)
                and doc.expires + self.skew * 1000 > self.clock() * 1000)

    async def acquire(self, cluster: str) -> bool:
        """Take the cluster's lease (or renew it if held). Returns whether this engine's cache of the cluster is
        still good (no other engine or run held the lease since this run started). Raises NotOwner if another
        engine holds it."""
        if self.holds(cluster):
            await self.renew(cluster)
            return True
        doc, etag = await self.holder(cluster)
        if self.live(doc):
            raise NotOwner(cluster, doc)
        # Nobody else has written the cluster since this engine's start (which read the whole store) if the lease
        # was never taken, or this very run took it last. A previous run of this state directory (or a live copy
        # of it) may have written since.
        fresh = doc is None or (doc.owner == self.owner and doc.run == self.run)
        epoch = (doc.epoch if doc else 0) + (0 if fresh else 1)
        await self._write(cluster, epoch, etag)
        if not fresh:
            log.info("lease taken", cluster=cluster, owner=self.owner, run=self.run, epoch=epoch,
                     previous=doc.owner if doc else None, previous_run=doc.run if doc else None)
        return fresh

    async def renew(self, cluster: str) -> None:
        """Extend a held lease; raises NotOwner (and lets go) if another engine took it meanwhile."""
        held = self.held.get(cluster)
        if held is None:
            raise NotOwner(cluster, None, f"cluster {cluster!r}: no lease to renew")
        await self._write(cluster, held.doc.epoch, held.etag)

    async def _write(self, cluster: str, epoch: int, etag: str | None, *, expires: float | None = None) -> None:
        start = self.monotonic()
        now = self.clock()
        doc = LeaseDoc(self.owner, self.addr, int(((now + self.ttl) if expires is None else expires) * 1000), epoch,
                       HOST, self.run)
        before = len(self.held)
        try:
            if etag is None:
                new = await self.storage.put_bytes(lease_key(cluster), doc.encode(), if_none_match=True)
            else:
                new = await self.storage.put_bytes(lease_key(cluster), doc.encode(), if_match=etag)
        except PreconditionFailed:
            self.held.pop(cluster, None)
            self._changed(before)
            theirs, _ = await self.holder(cluster)
            if theirs is not None and theirs.owner == self.owner and theirs.run != self.run:
                self._twin(cluster, theirs)
            raise NotOwner(cluster, theirs) from None
        if expires is None:
            self.held[cluster] = Held(doc, new, start, start + self.ttl - self.skew)
            self._changed(before)

    def _twin(self, cluster: str, theirs: LeaseDoc) -> None:
        """Another run of this owner id wrote the lease between this run's read and write of it: a live process, not a
        crashed previous run. From now on its lease is another engine's, or the two would take it from each other at
        every renewal, each with a cache that misses the other's writes."""
        if theirs.run in self.twins:
            return
        self.twins.add(theirs.run)
        log.error("another live process uses this state directory's identity (a copied state directory?): each "
                  "engine needs its own state directory; this one leaves the cluster to it until its lease expires",
                  cluster=cluster, owner=self.owner, run=self.run, twin_run=theirs.run, twin_host=theirs.host)

    async def clusters(self) -> list[str]:
        """Every cluster that has a lease object (held or not): one LIST of the leases' prefix."""
        return sorted(o.key[len(PREFIX):] for o in await self.storage.list(PREFIX))

    def drop(self, cluster: str) -> None:
        """Forget a lease another engine has taken (nothing is written)."""
        before = len(self.held)
        self.held.pop(cluster, None)
        self._changed(before)

    async def release(self, cluster: str) -> None:
        """Let go now: the lease object says it has expired, so another engine may take it at once."""
        before = len(self.held)
        held = self.held.pop(cluster, None)
        if held is None:
            return
        self._changed(before)
        try:
            await self._write(cluster, held.doc.epoch, held.etag, expires=self.clock() - self.skew - 1)
        except NotOwner as err:
            log.info("lease already taken by another engine; nothing to release", cluster=cluster, owner=self.owner,
                     holder=err.holder.owner if err.holder else None)
            return
        log.info("lease released", cluster=cluster, owner=self.owner)


__all__ = ["PREFIX", "SKEW", "TTL", "Held", "LeaseDoc", "Leases", "NotOwner", "lease_key"]
