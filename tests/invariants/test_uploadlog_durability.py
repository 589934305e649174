"""The upload log acknowledges an upload only after the fdatasync that covers its bytes has returned.

A SIGKILL cannot show a missing sync (the page cache outlives the process), so these tests watch the syncs
themselves: a sync that records, per segment, how many bytes it made durable; one that holds the sync open to see
that nothing is acknowledged meanwhile; and a power cut that keeps only the synced bytes, then replays them.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
from pathlib import Path

from sidecar.engine.uploadlog import UploadLog, encode_record


class RecordingSync:
    """An fdatasync that remembers, per file, how many bytes the last completed sync made durable."""

    def __init__(self) -> None:
        self.durable: dict[str, int] = {}
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, fd: int) -> None:
        size = os.fstat(fd).st_size  # one thread writes the log, and it is here: nothing is written meanwhile
        self.entered.set()
        self.gate.wait()
        os.fdatasync(fd)
        self.durable[os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))] = size


def opened(directory: Path, sync: RecordingSync, segment_size: int = 1 << 20) -> UploadLog:
    log = UploadLog(directory, segment_size=segment_size, sync=sync)
    assert list(log.replay()) == []
    log.end_replay()
    log.start()
    return log


def record_size(cluster: str, name: str, data: bytes) -> int:
    return sum(len(b) for b in encode_record(cluster, name, data))


class TestAcknowledgedMeansSynced:
    """The ordering of acknowledgement and fdatasync, seen from a sync the test controls."""

    async def test_no_acknowledgement_while_the_sync_is_under_way(self, tmp_path: Path) -> None:
        """An append whose bytes are written but not yet synced is not acknowledged until the sync returns."""
        sync = RecordingSync()
        log = opened(tmp_path, sync)
        try:
            sync.gate.clear()
            append = asyncio.ensure_future(log.append("c", "app.db", b"upload" * 100))
            assert await asyncio.to_thread(sync.entered.wait, 10), "the append never synced the log"
            for _ in range(20):  # the sync is held: whatever the loop runs meanwhile must not acknowledge
                await asyncio.sleep(0)
            assert not append.done()
            assert sync.durable == {}
            sync.gate.set()
            segment = await append
        finally:
            sync.gate.set()
            await log.close()
        assert sync.durable == {log.path(segment).name: record_size("c", "app.db", b"upload" * 100)}

    async def test_each_acknowledgement_follows_a_sync_covering_its_record(self, tmp_path: Path) -> None:
        """Appends one after another: when each returns, a completed sync has covered the file up to its end."""
        sync = RecordingSync()
        log = opened(tmp_path, sync, segment_size=3000)
        ends: dict[str, int] = {}
        try:
            for i in range(40):
                data = bytes([i]) * (50 * i + 1)
                segment = await log.append("c", f"db{i % 3}", data)
                name = log.path(segment).name
                ends[name] = ends.get(name, 0) + record_size("c", f"db{i % 3}", data)
                assert sync.durable.get(name, 0) >= ends[name], f"append {i} acknowledged before its sync"
        finally:
            await log.close()
        assert len(ends) > 3  # several segments were rolled through

    async def test_a_power_cut_after_any_acknowledgement_loses_nothing_acknowledged(self, tmp_path: Path) -> None:
        """Concurrent appends (group commits, segment rolls); a power cut keeping only synced bytes, taken right
        after each acknowledgement, replays every upload acknowledged so far."""
        sync = RecordingSync()
        log = opened(tmp_path / "log", sync, segment_size=20_000)
        rng = random.Random(7)
        acked: list[tuple[tuple[str, str, bytes], dict[str, int]]] = []

        async def upload(i: int) -> None:
            item = ("c", f"db{i % 5}", rng.randbytes(rng.randint(1, 4000)))
            await log.append(*item)
            acked.append((item, dict(sync.durable)))  # what a power cut right now would keep

        try:
            for wave in range(8):
                await asyncio.gather(*(upload(wave * 100 + j) for j in range(1 + wave * 3)))
        finally:
            await log.close()
        assert len(acked) == sum(1 + w * 3 for w in range(8)) and log.commits < len(acked)
        final = {p.name: p.read_bytes() for p in (tmp_path / "log").glob("*.log")}
        for n, (_, durable) in enumerate(acked):
            cut = tmp_path / f"cut-{n}"
            cut.mkdir()
            for name, data in final.items():
                (cut / name).write_bytes(data[:durable.get(name, 0)])
            replay = UploadLog(cut)
            replayed = {(r.cluster, r.name, bytes(r.data)) for r in replay.replay()}
            replay.end_replay()
            lost = [item for item, _ in acked[:n + 1] if item not in replayed]
            assert not lost, f"power cut after acknowledgement {n}: {len(lost)} acknowledged uploads lost"
