"""The upload log: group commit, replay after a crash, segments deleted oldest first, deletions not undone."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels
from sidecar.engine.uploadlog import UploadLog, encode_record
from sidecar.errors import SidecarError
from sidecar.storage import open_storage
from tests.engine.history import History


def opened(path: Path, segment_size: int = 1 << 20) -> UploadLog:
    log = UploadLog(path, segment_size=segment_size)
    assert list(log.replay()) == []
    log.end_replay()
    log.start()
    return log


async def test_concurrent_appends_share_commits_and_replay_in_order(tmp_path: Path) -> None:
    log = opened(tmp_path)
    payloads = [f"upload {i}".encode() * (i + 1) for i in range(200)]
    segments = await asyncio.gather(*(log.append("c", f"db{i % 7}", p) for i, p in enumerate(payloads)))
    assert set(segments) == {1}
    assert 1 <= log.commits < 200  # appends made while a commit was under way went out together
    again = UploadLog(tmp_path)  # the first is never closed: as after a crash
    records = list(again.replay())
    assert [(r.name, bytes(r.data)) for r in records] == [(f"db{i % 7}", p) for i, p in enumerate(payloads)]
    again.end_replay()


async def test_a_commit_delay_gathers_uploads_arriving_apart_into_one_sync(tmp_path: Path) -> None:
    """Uploads arriving 2 ms apart, within a 50 ms commit delay, share one fdatasync (without a delay each
    would get its own as soon as the previous sync ends), and each is acknowledged only once it is written."""
    syncs: list[int] = []

    def sync(fd: int) -> None:
        syncs.append(os.fstat(fd).st_size)
        os.fdatasync(fd)
    log = UploadLog(tmp_path, commit_delay=0.05, sync=sync)
    assert list(log.replay()) == []
    log.end_replay()
    log.start()

    async def one(i: int) -> int:
        await asyncio.sleep(i * 0.002)
        return await log.append("c", "db", b"x" * 100)
    await asyncio.gather(*(one(i) for i in range(10)))
    assert log.commits <= 2 and len(syncs) <= 2  # one, unless this machine stalled the test for 30 ms
    assert len(list(UploadLog(tmp_path).replay())) == 10


async def test_segments_roll_and_go_oldest_first_once_released(tmp_path: Path) -> None:
    log = opened(tmp_path, segment_size=100)
    first = await log.append("c", "a", b"x" * 150)  # fills segment 1
    second = await log.append("c", "b", b"y" * 150)  # rolls to segment 2
    third = await log.append("c", "c", b"z" * 10)  # segment 3
    assert (first, second, third) == (1, 2, 3)
    log.release(second)
    assert log.path(2).exists()  # segment 1 before it is still held
    log.release(first)
    assert not log.path(1).exists() and not log.path(2).exists()
    assert log.path(3).exists()
    await log.close()


async def test_a_damaged_record_followed_by_intact_ones_is_refused(tmp_path: Path) -> None:
    record = bytearray(b"".join(encode_record("c", "a", b"payload" * 10)))
    record[-3] ^= 1
    (tmp_path / f"{1:016x}.log").write_bytes(bytes(record) + b"".join(encode_record("c", "b", b"fine")))
    with pytest.raises(SidecarError, match=r"0000000000000001\.log: damaged record at offset 0"):
        list(UploadLog(tmp_path).replay())


async def test_a_deleted_database_is_not_brought_back_by_replay(tmp_path: Path, history: History) -> None:
    """Uploads pending when the database was deleted stay in an older segment; the deletion's record wins."""
    storage = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=3600))
    history.write()
    first = history.commit(1)
    await engine.write_tx("c", "gone.db", first)
    await engine.write_tx("c", "kept.db", first)
    await engine.delete_database("c", "gone.db")
    assert not engine.exists("c", "gone.db")
    engine.abandon()  # a crash: nothing flushed. The next start replays the log.
    again = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                              Levels(l0_interval=3600))
    assert not again.exists("c", "gone.db")
    assert again.status("c", "kept.db").pending_files == 1
    await again.close()


async def test_uploads_logged_after_a_deletion_survive_its_replay(tmp_path: Path, history: History) -> None:
    """Replaying a deletion lets go of the uploads before it; the segment still holds uploads after it, which are
    replayed, and stay on disk for the next start."""
    storage = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=3600))
    history.write()
    first = history.commit(1)
    await engine.write_tx("c", "gone.db", first)
    await engine.delete_database("c", "gone.db")
    await engine.write_tx("c", "kept.db", first)  # acknowledged after the deletion, in the same segment
    engine.abandon()
    for _ in range(2):  # a crash, and another: the upload is still there
        again = await Engine.open(open_storage(f"file://{tmp_path / 'store'}"), tmp_path / "state",
                                  Levels(l0_interval=3600))
        assert not again.exists("c", "gone.db")
        assert again.pos("c", "kept.db") == history.pos
        again.abandon()


async def test_a_cluster_named_log_does_not_stop_the_start(tmp_path: Path, history: History) -> None:
    """Cluster `log` keeps its index caches beside the upload log's segments: a database `1.log` is a directory
    named like a segment, which replay leaves alone."""
    storage = open_storage(f"file://{tmp_path / 'store'}")
    engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=0))
    history.write()
    await engine.write_tx("log", "1.log", history.commit(1))
    await engine.close()
    assert (tmp_path / "state" / "log" / "1.log").is_dir()
    engine = await Engine.open(storage, tmp_path / "state", Levels(l0_interval=0))
    assert engine.pos("log", "1.log") == history.pos
    await engine.close()
