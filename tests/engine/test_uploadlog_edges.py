"""The upload log at its edges: short and failed writes, batches beyond IOV_MAX, torn tails, odd files, segments."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest
import structlog

from sidecar.engine.uploadlog import HEAD, IOV_MAX, MAGIC, UploadLog, encode_record, read_record
from sidecar.errors import SidecarError, StorageError


def opened(path: Path, **kwargs: object) -> UploadLog:
    log = UploadLog(path, **kwargs)  # type: ignore[arg-type]
    assert list(log.replay()) == []
    log.end_replay()
    log.start()
    return log


def replayed(path: Path) -> list[tuple[str, str, bytes]]:
    """What a restart finds: every record, in order (the log that replays it is then dropped, as by a crash)."""
    log = UploadLog(path)
    out = [(r.cluster, r.name, bytes(r.data)) for r in log.replay()]
    log.end_replay()
    return out


def record(cluster: str, name: str, data: bytes) -> bytes:
    return b"".join(encode_record(cluster, name, data))


class ShortWrites:
    """A writev that writes at most `limit` bytes a call, as a disk may under pressure."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.calls = 0

    def __call__(self, fd: int, views: Sequence[memoryview]) -> int:
        self.calls += 1
        return os.write(fd, b"".join(bytes(v) for v in views)[:self.limit])


class FailingWrites:
    """A writev that writes part of the batch, then fails as a full disk does, while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False

    def __call__(self, fd: int, views: Sequence[memoryview]) -> int:
        if self.failing:
            os.write(fd, bytes(views[0])[:10])
            raise OSError(errno.ENOSPC, "No space left on device")
        return os.writev(fd, views)


class TestWrites:
    """However the writes go, an acknowledged record is whole on disk, and a failed one leaves nothing."""

    async def test_short_writes_go_on_from_where_they_stopped(self, tmp_path: Path) -> None:
        writes = ShortWrites(7)
        log = opened(tmp_path, writev=writes)
        items = [("c", f"db{i}", bytes([i]) * (30 + i)) for i in range(5)]
        await asyncio.gather(*(log.append(*item) for item in items))
        await log.close()
        assert writes.calls >= sum(len(record(*item)) for item in items) / 7
        assert replayed(tmp_path) == items

    async def test_a_batch_of_more_buffers_than_iov_max(self, tmp_path: Path) -> None:
        """One group commit of more records than one writev takes (2 buffers each) is written whole, in order."""
        log = opened(tmp_path)
        items = [("c", "app.db", i.to_bytes(4, "big")) for i in range(IOV_MAX)]
        await asyncio.gather(*(log.append(*item) for item in items))
        assert log.commits < 5
        await log.close()
        assert replayed(tmp_path) == items

    async def test_a_failed_write_fails_its_batch_and_leaves_nothing(self, tmp_path: Path) -> None:
        writes = FailingWrites()
        log = opened(tmp_path, writev=writes)
        assert await log.append("c", "a.db", b"before") == 1
        writes.failing = True
        with pytest.raises(StorageError, match=r"^upload log: the server's disk is full$") as err:
            await log.append("c", "b.db", b"lost")
        assert (err.value.key, err.value.retryable, log.disk_full) == ("upload log", True, True)
        assert log.path(1).stat().st_size == len(record("c", "a.db", b"before"))  # the partial bytes cut off
        writes.failing = False
        assert await log.append("c", "c.db", b"after") == 1
        await log.close()
        assert replayed(tmp_path) == [("c", "a.db", b"before"), ("c", "c.db", b"after")]

    async def test_an_append_queued_behind_a_failed_batch_is_still_written(self, tmp_path: Path) -> None:
        """The commit loop goes on after a failed batch: what queued meanwhile is written, not left waiting."""
        entered, gate = threading.Event(), threading.Event()

        def writev(fd: int, views: Sequence[memoryview]) -> int:
            if not entered.is_set():
                entered.set()
                gate.wait(10)
                raise OSError(errno.EIO, "Input/output error")
            return os.writev(fd, views)

        log = opened(tmp_path, writev=writev)
        first = asyncio.ensure_future(log.append("c", "a.db", b"fails"))
        assert await asyncio.to_thread(entered.wait, 10)
        second = asyncio.ensure_future(log.append("c", "b.db", b"queued meanwhile"))
        await asyncio.sleep(0)
        gate.set()
        with pytest.raises(StorageError, match="Input/output error"):
            await first
        assert await asyncio.wait_for(second, 10) == 1
        await log.close()
        assert replayed(tmp_path) == [("c", "b.db", b"queued meanwhile")]

    async def test_each_commit_is_counted(self, tmp_path: Path) -> None:
        log = opened(tmp_path)
        for i in range(3):
            await log.append("c", "a.db", bytes([i]))
        assert log.commits == 3
        await log.close()

    async def test_a_normal_commit_is_not_reported_slow(self, tmp_path: Path) -> None:
        log = opened(tmp_path)
        with structlog.testing.capture_logs() as logs:
            await log.append("c", "a.db", b"quick")
        await log.close()
        assert [e for e in logs if e["log_level"] != "debug"] == []

    async def test_abandon_does_not_wait_for_a_commit_under_way(self, tmp_path: Path) -> None:
        """Like a crash: a sync still running does not hold abandon() up, and nothing more is appended."""
        gate = threading.Event()

        def sync(fd: int) -> None:
            gate.wait(10)
            os.fdatasync(fd)

        log = opened(tmp_path, sync=sync)
        append = asyncio.ensure_future(log.append("c", "a.db", b"in flight"))
        await asyncio.sleep(0.01)  # let the commit reach the (held) sync; abandon must not wait for it either way
        done = threading.Thread(target=log.abandon)
        done.start()
        done.join(5)
        try:
            assert not done.is_alive(), "abandon() waited for the commit"
        finally:
            gate.set()
            done.join()
        with pytest.raises(StorageError, match="closed"):
            await log.append("c", "b.db", b"after the crash")
        append.cancel()

    async def test_a_closed_log_refuses_appends(self, tmp_path: Path) -> None:
        log = opened(tmp_path)
        await log.close()
        with pytest.raises(StorageError, match=r"^upload log: closed$") as err:
            await log.append("c", "a.db", b"x")
        assert (err.value.key, err.value.retryable) == ("upload log", False)


class TestReplay:
    """What a restart makes of the files in the log directory."""

    def test_a_torn_tail_is_cut_off(self, tmp_path: Path) -> None:
        """A record cut short by a crash (never acknowledged) is dropped and the segment truncated before it."""
        whole = record("c", "a.db", b"whole") + record("c", "b.db", b"also whole")
        torn = record("c", "c.db", b"torn" * 10)
        segment = tmp_path / f"{1:016x}.log"
        for cut in (1, HEAD.size - 1, HEAD.size + 3, len(torn) - 1):
            segment.write_bytes(whole + torn[:cut])
            assert replayed(tmp_path) == [("c", "a.db", b"whole"), ("c", "b.db", b"also whole")]
            assert segment.stat().st_size == len(whole)

    def test_a_damaged_last_record_is_a_torn_tail(self, tmp_path: Path) -> None:
        """A last record whose checksum fails (its bytes half written) is dropped like a short one."""
        last = bytearray(record("c", "b.db", b"half written"))
        last[-1] ^= 0xFF
        (tmp_path / f"{1:016x}.log").write_bytes(record("c", "a.db", b"fine") + bytes(last))
        assert replayed(tmp_path) == [("c", "a.db", b"fine")]

    def test_segments_replay_in_order_and_other_files_are_left_alone(self, tmp_path: Path) -> None:
        (tmp_path / f"{2:016x}.log").write_bytes(record("c", "b.db", b"second"))
        (tmp_path / f"{1:016x}.log").write_bytes(record("c", "a.db", b"first"))
        (tmp_path / f"{3:016x}.log").write_bytes(b"")
        (tmp_path / "notes.log").write_bytes(b"not a segment")
        (tmp_path / "README").write_bytes(b"neither")
        log = UploadLog(tmp_path)
        assert [(r.segment, r.offset, r.name, bytes(r.data)) for r in log.replay()] == \
            [(1, 0, "a.db", b"first"), (2, 0, "b.db", b"second")]
        log.end_replay()
        assert log.segments == 3
        log.start()  # nothing holds the replayed segments: they go, the new one stays
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{4:016x}.log", "README", "notes.log"]
        assert (tmp_path / "notes.log").read_bytes() == b"not a segment"
        log.abandon()

    def test_segment_numbers_are_hexadecimal_and_odd_names_are_skipped_wherever_they_sort(self, tmp_path: Path) -> None:
        (tmp_path / "0-notes.log").write_bytes(b"sorts before every segment")
        (tmp_path / f"{0x0f:016x}.log").write_bytes(b"")  # empty: skipped, the rest still replayed
        (tmp_path / f"{0x10:016x}.log").write_bytes(record("c", "a.db", b"sixteen"))
        (tmp_path / f"{0x1a:016x}.log").write_bytes(record("c", "b.db", b"twenty-six"))
        log = UploadLog(tmp_path)
        assert [(r.segment, bytes(r.data)) for r in log.replay()] == [(0x10, b"sixteen"), (0x1a, b"twenty-six")]
        log.end_replay()
        log.start()
        assert log.path(0x1b).exists()
        log.abandon()

    def test_replay_creates_the_directory(self, tmp_path: Path) -> None:
        log = UploadLog(tmp_path / "state" / "log")
        assert list(log.replay()) == []
        log.end_replay()
        assert (tmp_path / "state" / "log").is_dir()

    def test_only_a_torn_tail_is_reported(self, tmp_path: Path) -> None:
        segment = tmp_path / f"{1:016x}.log"
        whole = record("c", "a.db", b"whole")
        segment.write_bytes(whole)
        with structlog.testing.capture_logs() as logs:
            assert replayed(tmp_path) == [("c", "a.db", b"whole")]
        assert logs == []
        segment.write_bytes(whole + b"LSU1 cut")
        with structlog.testing.capture_logs() as logs:
            assert replayed(tmp_path) == [("c", "a.db", b"whole")]
        assert [(e["event"], e["offset"], e["bytes"]) for e in logs] == \
            [("upload log: torn record dropped (it was never acknowledged)", len(whole), 8)]

    def test_damage_before_intact_records_is_refused_even_with_a_torn_tail(self, tmp_path: Path) -> None:
        """Acknowledged records after a damaged one are found wherever they are, not only the last one."""
        damaged = bytearray(record("c", "b.db", b"damaged"))
        damaged[-1] ^= 1
        segment = record("c", "a.db", b"ok") + bytes(damaged) + record("c", "c.db", b"intact") + \
            record("c", "d.db", b"torn")[:-3]
        (tmp_path / f"{1:016x}.log").write_bytes(segment)
        with pytest.raises(SidecarError, match=r"0000000000000001\.log: damaged record at offset \d+, followed by "
                                               r"intact records: acknowledged uploads would be lost; restore this "
                                               r"file from a copy or remove it to accept the loss$"):
            replayed(tmp_path)

    def test_an_upload_holding_a_whole_record_is_not_taken_for_one(self, tmp_path: Path) -> None:
        """A client's upload is arbitrary bytes, so it can hold a valid record. Torn by a crash after that inner
        record, it is a torn tail like any other, not damage followed by intact records that stops the start."""
        inner = record("c", "b.db", b"a record inside an upload")
        torn = record("c", "evil.db", b"before" + inner + b"after" * 20)
        whole = record("c", "a.db", b"whole")
        segment = tmp_path / f"{1:016x}.log"
        segment.write_bytes(whole + torn[:len(torn) - 50])
        with structlog.testing.capture_logs() as logs:
            assert replayed(tmp_path) == [("c", "a.db", b"whole")]
        assert [e["event"] for e in logs] == ["upload log: torn record dropped (it was never acknowledged)"]
        assert segment.stat().st_size == len(whole)

    def test_an_intact_record_after_a_damaged_ones_claimed_bytes_is_still_found(self, tmp_path: Path) -> None:
        damaged = bytearray(record("c", "b.db", b"before" + record("c", "x.db", b"inner") + b"after"))
        damaged[-2] ^= 1
        (tmp_path / f"{1:016x}.log").write_bytes(bytes(damaged) + record("c", "c.db", b"intact"))
        with pytest.raises(SidecarError, match="damaged record at offset 0, followed by intact records"):
            replayed(tmp_path)

    def test_version_1_records_are_still_replayed(self, tmp_path: Path) -> None:
        """Written before the header had a checksum of its own: the log of a server upgraded mid-flight."""
        def v1(cluster: bytes, name: bytes, data: bytes) -> bytes:
            crc = zlib.crc32(data, zlib.crc32(name, zlib.crc32(cluster)))
            return struct.pack(">4sIQHH", b"LSU1", crc, len(data), len(cluster), len(name)) + cluster + name + data

        (tmp_path / f"{1:016x}.log").write_bytes(v1(b"c", b"a.db", b"old") + v1(b"c", b"b.db", b"older")[:-1])
        (tmp_path / f"{2:016x}.log").write_bytes(record("c", "a.db", b"new"))
        assert replayed(tmp_path) == [("c", "a.db", b"old"), ("c", "a.db", b"new")]

    def test_a_header_whose_own_checksum_fails_is_damage_not_a_claim(self, tmp_path: Path) -> None:
        damaged = bytearray(record("c", "b.db", b"x" * 100))
        damaged[8 + 4] ^= 0x40  # the data length: the header's checksum no longer matches, so nothing is skipped
        (tmp_path / f"{1:016x}.log").write_bytes(bytes(damaged) + record("c", "c.db", b"intact"))
        with pytest.raises(SidecarError, match="damaged record at offset 0, followed by intact records"):
            replayed(tmp_path)

    def test_a_stray_byte_before_an_intact_record_is_damage(self, tmp_path: Path) -> None:
        (tmp_path / f"{1:016x}.log").write_bytes(record("c", "a.db", b"ok") + b"!" + record("c", "b.db", b"intact"))
        with pytest.raises(SidecarError, match="followed by intact records"):
            replayed(tmp_path)

    def test_held_segments_survive_start(self, tmp_path: Path) -> None:
        """start() deletes replayed segments oldest first, stopping at the first one still held."""
        for segment in (1, 2, 3):
            (tmp_path / f"{segment:016x}.log").write_bytes(record("c", "a.db", bytes([segment])))
        log = UploadLog(tmp_path)
        for r in log.replay():
            if r.segment == 2:
                log.hold(r.segment)
        log.end_replay()
        log.start()
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n:016x}.log" for n in (2, 3, 4)]
        log.release(2)  # now nothing before the active segment is held
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{4:016x}.log"]
        log.abandon()

    def test_a_release_during_replay_deletes_nothing(self, tmp_path: Path) -> None:
        """Segments are known only once replayed: a record let go mid-replay deletes none (start() does)."""
        (tmp_path / f"{1:016x}.log").write_bytes(record("c", "a.db", b"1") + record("c", "b.db", b"2"))
        log = UploadLog(tmp_path)
        for r in log.replay():
            log.hold(r.segment)
            if r.name == "a.db":
                log.release(r.segment)  # a.db was deleted: its upload is let go before b.db's is replayed
        log.end_replay()
        log.start()
        assert sorted(p.name for p in tmp_path.iterdir()) == [f"{n:016x}.log" for n in (1, 2)]
        log.abandon()

    async def test_records_appended_after_a_restart_go_to_a_new_segment(self, tmp_path: Path) -> None:
        (tmp_path / f"{5:016x}.log").write_bytes(record("c", "a.db", b"old"))
        log = UploadLog(tmp_path)
        for r in log.replay():
            log.hold(r.segment)
        log.end_replay()
        log.start()
        assert await log.append("c", "a.db", b"new") == 6
        await log.close()
        assert replayed(tmp_path) == [("c", "a.db", b"old"), ("c", "a.db", b"new")]


class TestSegments:
    """Segments roll at their size and go when nothing in or before them is live."""

    async def test_a_segment_rolls_once_it_reaches_its_size(self, tmp_path: Path) -> None:
        size = len(record("c", "a.db", b"x" * 50))
        log = opened(tmp_path, segment_size=2 * size)
        assert [await log.append("c", "a.db", b"x" * 50) for _ in range(5)] == [1, 1, 2, 2, 3]
        await log.close()

    async def test_a_segment_stays_while_any_of_its_records_is_live(self, tmp_path: Path) -> None:
        size = len(record("c", "a.db", b"x" * 50))
        log = opened(tmp_path, segment_size=2 * size)
        segments = [await log.append("c", name, b"x" * 50) for name in ("a.db", "b.db", "c.db")]
        assert segments == [1, 1, 2]
        log.release(1)  # a.db flushed; b.db, in the same segment, is not
        assert log.path(1).exists()
        log.release(1)
        assert not log.path(1).exists()
        await log.close()

    async def test_segments_are_created_readable_by_all_writable_by_the_owner(self, tmp_path: Path) -> None:
        umask = os.umask(0)
        os.umask(umask)
        log = opened(tmp_path)
        await log.append("c", "a.db", b"x")
        assert stat.S_IMODE(log.path(1).stat().st_mode) == 0o644 & ~umask
        await log.close()

    async def test_a_segment_that_cannot_be_created_leaves_appends_on_the_current_one(self, tmp_path: Path) -> None:
        """A roll that fails (no inode or directory space left) neither leaves the upload waiting forever nor
        closes the current segment's descriptor, which the process may reuse for another file."""
        log = opened(tmp_path, segment_size=10)
        assert await log.append("c", "a.db", b"x" * 20) == 1
        log.path(2).mkdir()  # the next segment cannot be created
        with structlog.testing.capture_logs() as logs:
            assert await asyncio.wait_for(log.append("c", "b.db", b"y"), 10) == 1
        assert [e["event"] for e in logs] == ["upload log: could not start a new segment"]
        log.path(2).rmdir()
        other = os.open(tmp_path / "other", os.O_WRONLY | os.O_CREAT)
        try:
            assert await asyncio.wait_for(log.append("c", "c.db", b"z"), 10) == 2
            os.write(other, b"mine")
        finally:
            os.close(other)
        await log.close()
        assert replayed(tmp_path) == [("c", "a.db", b"x" * 20), ("c", "b.db", b"y"), ("c", "c.db", b"z")]
        assert (tmp_path / "other").read_bytes() == b"mine"

    async def test_a_segment_removed_by_hand_is_not_an_error(self, tmp_path: Path) -> None:
        """An operator removed a segment (as the damaged-record error suggests): releasing or closing goes on."""
        log = opened(tmp_path, segment_size=10)
        first = await log.append("c", "a.db", b"x" * 20)
        second = await log.append("c", "b.db", b"y" * 20)
        log.path(first).unlink()
        log.release(first)
        assert log.segments == 1 and log.path(2).exists()
        log.path(second).unlink()
        log.release(second)
        await log.close()
        assert list(tmp_path.iterdir()) == []

    async def test_close_waits_for_the_commit_under_way(self, tmp_path: Path) -> None:
        """An append being synced when the log closes completes, and is on disk."""
        entered, gate = threading.Event(), threading.Event()

        def sync(fd: int) -> None:
            entered.set()
            gate.wait(10)
            os.fdatasync(fd)

        log = opened(tmp_path, sync=sync)
        append = asyncio.ensure_future(log.append("c", "a.db", b"in flight"))
        assert await asyncio.to_thread(entered.wait, 10)
        closing = asyncio.ensure_future(log.close())
        await asyncio.sleep(0)
        gate.set()
        assert await append == 1
        await closing
        assert replayed(tmp_path) == [("c", "a.db", b"in flight")]

    async def test_close_deletes_every_segment_once_nothing_is_live(self, tmp_path: Path) -> None:
        log = opened(tmp_path, segment_size=10)
        segments = [await log.append("c", "a.db", b"x" * 20) for _ in range(3)]
        for segment in segments:
            log.release(segment)
        await log.close()
        assert list(tmp_path.iterdir()) == []

    async def test_close_keeps_segments_with_live_records(self, tmp_path: Path) -> None:
        log = opened(tmp_path, segment_size=10)
        first = await log.append("c", "a.db", b"x" * 20)
        second = await log.append("c", "b.db", b"y" * 20)
        log.release(second)
        await log.close()
        assert (first, second) == (1, 2)
        assert replayed(tmp_path) == [("c", "a.db", b"x" * 20), ("c", "b.db", b"y" * 20)]

    async def test_abandon_keeps_everything(self, tmp_path: Path) -> None:
        log = opened(tmp_path)
        segment = await log.append("c", "a.db", b"kept")
        log.release(segment)
        log.abandon()
        assert replayed(tmp_path) == [("c", "a.db", b"kept")]


class TestRecords:
    """One record: what read_record accepts."""

    def test_round_trip(self) -> None:
        data = record("cluster", "name.db", b"payload")
        found = read_record(7, memoryview(data + b"more"), 0)
        assert found is not None
        rec, end = found
        assert (rec.segment, rec.offset, rec.cluster, rec.name, bytes(rec.data), end) == \
            (7, 0, "cluster", "name.db", b"payload", len(data))

    @pytest.mark.parametrize("at", ["magic", "crc", "cluster", "name", "data"])
    def test_any_damage_is_refused(self, at: str) -> None:
        """The checksum covers the cluster, the name and the data; the magic must be there."""
        data = bytearray(record("cluster", "name.db", b"payload"))
        offset = {"magic": 0, "crc": 4, "cluster": HEAD.size, "name": HEAD.size + 7, "data": len(data) - 1}[at]
        data[offset] ^= 0x01
        assert read_record(1, memoryview(bytes(data)), 0) is None

    def test_a_name_that_is_not_utf8_is_refused(self) -> None:
        import struct
        import zlib
        c, n, d = b"c", b"\xff\xfe", b"data"
        crc = zlib.crc32(d, zlib.crc32(n, zlib.crc32(c)))
        data = struct.pack(">4sIQHH", MAGIC, crc, len(d), len(c), len(n)) + c + n + d
        assert read_record(1, memoryview(data), 0) is None

    def test_an_empty_record_is_a_deletion(self) -> None:
        found = read_record(1, memoryview(record("c", "gone.db", b"")), 0)
        assert found is not None and bytes(found[0].data) == b""
