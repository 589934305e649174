"""Where each page of one stored LTX v3 file is, from its page index, read whole or a window at a time.

An LTX v3 file ends with a page index (spec/ltx.md §2.3): for each stored page, ascending, three
unsigned LEB128 varints (pgno, offset of its frame, size of its frame), then a `0`, then the index's byte
length (u64) and the 16-byte trailer. A small file's index comes whole with the first ranged read of its
tail. A big one (a 1 GiB snapshot has ~2.5 MB of index) is read in windows around the page wanted:

- the byte position of page p is interpolated between the nearest entries already known (the index of a
  snapshot is nearly linear in pgno), and a window of WINDOW bytes around it is read;
- a window that starts at an unknown byte is realigned: varints end at bytes below 0x80, so values are
  found from the first such byte; which value starts an entry is the one phase of three under which every
  entry's frame starts where the previous one's ends (frames are written back to back) and page numbers
  ascend. A window where no single phase fits is not used: the caller reads the whole span between known
  entries instead, which is always aligned.

So a page of a 1 GiB snapshot costs one or two ranged reads of 16 KiB of index instead of 2.5 MB. Index bytes
already read (a small file's whole index comes with one read) are held and decoded a 1 KiB window at a
time too. A caller finds a page with this loop, doing the reads itself (the reader over the network, the
server locally):

    attempt = 0
    while (found := index.find(pgno)) raises Unknown:
        if not index.settle(pgno):                  # not from the bytes held: read a window
            start, length, a, b = index.read_for(pgno, attempt)
            attempt = attempt + 1 if index.take(read(start, length), start, a, b) else MAX_PROBES
"""

from __future__ import annotations

import bisect
import struct
from dataclasses import dataclass, field

TRAILER_SIZE = 16
FRAME_HEADER = 10  # pgno u32, flags u16, compressed size u32
WINDOW = 16 << 10  # bytes of index read around a page
MAX_PROBES = 4  # windows tried for one page before reading the whole span around it
LOCAL_WINDOW = 1 << 10  # bytes decoded around a page from index bytes already held (~110 entries)
TAIL = 64 << 10  # most bytes read from the end of a file to find its index (the whole file when smaller)
WHOLE = 32 << 10  # a file up to this size is read whole: its pages come with its index


def tail_length(size: int) -> int:
    """How much of the end of a file of `size` bytes to read for its page index, in one read.

    An entry takes ~9 bytes and describes a frame that is rarely under 576 bytes (4 KiB pages compress
    less than 7:1), so 1/64 of the file nearly always holds the whole index; at least 4 KiB, at most TAIL
    (a bigger index is read by windows). `index_span` tells the caller when it fell short.
    """
    return min(size, TAIL, max(4096, size // 64))


class Unknown(Exception):
    """The page's entry lies in a part of the index not read yet."""


@dataclass(slots=True)
class Entries:
    """Consecutive index entries, and the bytes [start, end) of the index they were decoded from."""

    start: int
    end: int
    pgnos: list[int] = field(default_factory=list)
    offsets: list[int] = field(default_factory=list)
    sizes: list[int] = field(default_factory=list)


def index_span(tail: bytes, file_size: int) -> tuple[int, int]:
    """From the last bytes of a file (at least 24), the file offsets [start, end) of its index entries.

    `end` excludes the terminating `0`. Raises ValueError when the tail does not describe an index.
    """
    if len(tail) < TRAILER_SIZE + 8:
        raise ValueError(f"tail of {len(tail)} bytes: want at least {TRAILER_SIZE + 8}")
    (length,) = struct.unpack_from(">Q", tail, len(tail) - TRAILER_SIZE - 8)
    end = file_size - TRAILER_SIZE - 8
    start = end - length
    if length < 1 or start < 100:
        raise ValueError(f"page index length {length} does not fit a file of {file_size} bytes")
    if len(tail) > TRAILER_SIZE + 8 and tail[-TRAILER_SIZE - 9] != 0:
        raise ValueError("page index does not end with its 0 terminator")
    return start, end - 1


def decode(data: bytes | memoryview, base: int, *, aligned_start: bool, aligned_end: bool,
           min_entries: int = 2) -> Entries | None:
    """Decode the entries in `data` (index bytes from file offset `base`).

    `aligned_start`/`aligned_end`: whether `data` starts/ends on an entry boundary. Unaligned edges are
    realigned (see the module docstring); returns None when that is ambiguous.
    """
    buf = bytes(data)
    n = len(buf)
    i = 0
    if not aligned_start:
        while i < n and buf[i] >= 0x80:
            i += 1
        i += 1  # the first value starts after the first byte that ends one
    values: list[int] = []
    starts: list[int] = []
    value = shift = 0
    begin = i
    for j in range(i, n):
        byte = buf[j]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            values.append(value)
            starts.append(begin)
            value = shift = 0
            begin = j + 1
        else:
            shift += 7
            if shift > 63:
                if aligned_start and aligned_end:  # no other reading of these bytes: not an index
                    raise ValueError(f"page index at {base + j}: varint overflows 64 bits")
                return None
    if shift and aligned_end:
        raise ValueError(f"page index at {base + n}: ends inside a varint")
    fits = []
    for phase in ((0,) if aligned_start else (0, 1, 2)):
        count = (len(values) - phase) // 3
        if aligned_end and (len(values) - phase) % 3:
            continue
        if count < (1 if aligned_start and aligned_end else min_entries):
            continue
        p, o, s = values[phase::3][:count], values[phase + 1::3][:count], values[phase + 2::3][:count]
        if all(p[k] < p[k + 1] and o[k] + s[k] == o[k + 1] for k in range(count - 1)) and \
                all(v > FRAME_HEADER for v in s) and p[0] > 0:
            fits.append((phase, count, p, o, s))
    if len(fits) != 1:
        if aligned_start and aligned_end and not values:
            return Entries(base, base + n)
        if aligned_start and aligned_end:
            raise ValueError(f"page index at {base}: entries are not consecutive frames")
        return None
    phase, count, p, o, s = fits[0]
    first = starts[phase]
    last_end = starts[phase + 3 * count] if phase + 3 * count < len(starts) else begin
    return Entries(base + first, base + last_end, p, o, s)


@dataclass
class SparseIndex:
    """The parts of one file's page index read so far, answering `find(pgno)` or asking for a window.

    `start`/`end` bound the index entries in the file; `top` is a page number above every stored one.
    """

    start: int
    end: int
    top: int
    window_size: int = WINDOW
    runs: list[Entries] = field(default_factory=list)  # disjoint, sorted by byte position
    held_at: int = 0  # index bytes read but not decoded yet (decoding 100,000 entries costs ~0.3 s)
    held: bytes = b""

    def hold(self, start: int, data: bytes) -> None:
        """Keep raw index bytes read at `start`; `settle` decodes only the part around a page asked for."""
        self.held_at, self.held = start, bytes(data)

    def settle(self, pgno: int) -> bool:
        """Decode the entries around `pgno` from the bytes held, if they cover them; whether it did."""
        if not self.held:
            return False
        for size in (LOCAL_WINDOW, 1 << 62):  # a window, or (ambiguous) the whole gap between known entries
            saved, self.window_size = self.window_size, size
            try:
                start, length, a, b = self.window(pgno)
            finally:
                self.window_size = saved
            lo = start - self.held_at
            if lo < 0 or lo + length > len(self.held):
                return False
            if self.take(self.held[lo:lo + length], start, a, b):
                return True
        return False

    @property
    def complete(self) -> bool:
        return len(self.runs) == 1 and self.runs[0].start == self.start and self.runs[0].end == self.end

    def add(self, run: Entries) -> None:
        """Remember decoded entries; overlapping or touching runs are merged."""
        runs = [*self.runs, run]
        runs.sort(key=lambda r: r.start)
        merged: list[Entries] = []
        for r in runs:
            if merged and r.start <= merged[-1].end:
                m = merged[-1]
                if r.end > m.end:
                    k = bisect.bisect_right(r.pgnos, m.pgnos[-1]) if m.pgnos else 0
                    m.pgnos += r.pgnos[k:]
                    m.offsets += r.offsets[k:]
                    m.sizes += r.sizes[k:]
                    m.end = r.end
            else:
                merged.append(Entries(r.start, r.end, list(r.pgnos), list(r.offsets), list(r.sizes)))
        self.runs = merged

    def find(self, pgno: int) -> tuple[int, int] | None:
        """(offset, size) of the page's frame; None if the file does not hold it; raises Unknown."""
        for i, r in enumerate(self.runs):
            if not r.pgnos:
                continue
            if r.pgnos[0] <= pgno <= r.pgnos[-1]:
                k = bisect.bisect_left(r.pgnos, pgno)
                return (r.offsets[k], r.sizes[k]) if r.pgnos[k] == pgno else None
            below_start = pgno < r.pgnos[0] and (r.start == self.start or (
                i > 0 and self.runs[i - 1].end == r.start and self.runs[i - 1].pgnos and
                self.runs[i - 1].pgnos[-1] < pgno))
            if below_start:
                return None
            if pgno > r.pgnos[-1] and r.end == self.end:
                return None
        if self.complete or self.start >= self.end:
            return None
        raise Unknown(pgno)

    def known(self, pgno: int) -> tuple[int, int] | None:
        """As `find`, but None also when unknown: for read-ahead, which never waits for the index."""
        try:
            return self.find(pgno)
        except Unknown:
            return None

    def read_for(self, pgno: int, attempt: int) -> tuple[int, int, bool, bool]:
        """What to read on the `attempt`-th try (from 0) to find `pgno`: a window, or from MAX_PROBES on
        everything between the known entries around it (aligned, so it always decodes)."""
        if attempt < MAX_PROBES:
            return self.window(pgno)
        size, self.window_size = self.window_size, 1 << 62
        try:
            return self.window(pgno)
        finally:
            self.window_size = size

    def take(self, data: bytes | memoryview, start: int, aligned_start: bool, aligned_end: bool) -> bool:
        """Decode and remember the index bytes `data` read at `start`; False when a window was ambiguous.
        Raises ValueError when aligned bytes are not an index."""
        run = decode(data, start, aligned_start=aligned_start, aligned_end=aligned_end)
        if run is None:
            return False
        self.add(run)
        return True

    def window(self, pgno: int) -> tuple[int, int, bool, bool]:
        """The next bytes to read for `pgno`: (offset, length, aligned_start, aligned_end).

        Interpolates between the nearest known entries around `pgno` and reads a window there, or the
        whole gap between them when it is no larger (that read is aligned at both ends, so it always decodes).
        """
        lo_pgno, lo_pos = 0, self.start
        hi_pgno, hi_pos = self.top, self.end
        for r in self.runs:
            if not r.pgnos:
                continue
            if r.pgnos[-1] < pgno and r.end >= lo_pos:
                lo_pgno, lo_pos = r.pgnos[-1], r.end
            if r.pgnos[0] > pgno and r.start <= hi_pos:
                hi_pgno, hi_pos = r.pgnos[0], r.start
                break
        gap, size = hi_pos - lo_pos, self.window_size
        if gap <= size:
            return lo_pos, gap, True, True
        frac = (pgno - lo_pgno) / max(1, hi_pgno - lo_pgno)
        guess = lo_pos + int(frac * gap)
        begin = max(lo_pos, min(guess - size // 2, hi_pos - size))
        return begin, size, begin == lo_pos, begin + size == hi_pos


__all__ = ["LOCAL_WINDOW", "MAX_PROBES", "TAIL", "WHOLE", "WINDOW", "Entries", "SparseIndex", "Unknown", "decode",
           "index_span", "tail_length"]
