"""The file store's group commit: concurrent writes share syncfs calls, each write returns only after a syncfs
that began after it, and a failed syncfs fails the writes it covered without storing them."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import fsutil
from sidecar.errors import NotFound, StorageError
from sidecar.fsutil import GroupSync
from sidecar.storage.file import FileStorage

pytestmark = pytest.mark.skipif(fsutil._LIBC is None, reason="syncfs reports errors on Linux 5.8 and later only")


class Syncfs:
    """The real syncfs(2), counted and timed; `fail` makes the next calls fail with EIO instead."""

    def __init__(self, real: ctypes.CDLL) -> None:
        self.real = real
        self.calls: list[tuple[float, float]] = []
        self.fail = 0
        self.began = threading.Event()  # set as each call begins
        self.delay = 0.002  # a slower disk: writers arrive while it runs
        self.lock = threading.Lock()

    def syncfs(self, fd: int) -> int:
        start = time.monotonic()
        self.began.set()
        if self.fail:
            self.fail -= 1
            ctypes.set_errno(errno.EIO)
            rc = -1
        else:
            rc = self.real.syncfs(fd)
            time.sleep(self.delay)
        with self.lock:
            self.calls.append((start, time.monotonic()))
        return int(rc)


@pytest.fixture
def syncfs(monkeypatch: pytest.MonkeyPatch) -> Iterator[Syncfs]:
    counted = Syncfs(fsutil._LIBC)  # type: ignore[arg-type]
    monkeypatch.setattr(fsutil, "_LIBC", counted)
    yield counted


async def test_concurrent_writes_share_syncfs_calls(tmp_path: Path, syncfs: Syncfs) -> None:
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("first", b"makes the root")  # the first write makes the root, with fsyncs
    syncfs.calls.clear()
    keys = [f"c/db{i % 8}/ltx/0/{i:016x}.ltx" for i in range(64)]
    await asyncio.gather(*(store.put_bytes(k, k.encode(), if_none_match=True) for k in keys))
    assert [await store.get_bytes(k) for k in keys] == [k.encode() for k in keys]
    assert 2 <= len(syncfs.calls) <= 16, "64 writes made durable one by one, not as groups"
    assert not list((tmp_path / "store").rglob("*.tmp"))


async def test_while_writes_are_under_way_a_syncfs_waits_for_more_to_join(tmp_path: Path, syncfs: Syncfs,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Twelve writes arriving 3 ms apart (a server's flushes, each at its own moment) share three syncfs calls: the
    first write's, then, once the gather has passed, one for every write's data and one for every name. Made as
    they come, they took 7 to 10 on this machine. Each write is still durable when it returns."""
    from sidecar.storage import file as file_store

    monkeypatch.setattr(file_store, "GATHER", 0.1)
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("first", b"makes the root")
    keys = [f"c/db{i}/ltx/0/{i:016x}.ltx" for i in range(12)]
    for i in range(12):  # the directories, made once
        await store.put_bytes(f"c/db{i}/ltx/0/made", b"")
    await asyncio.sleep(0.1)  # past the gather of the writes above
    syncfs.calls.clear()

    async def put(i: int) -> None:
        await asyncio.sleep(0.003 * i)
        await store.put_bytes(keys[i], keys[i].encode(), if_none_match=True)
    await asyncio.gather(*(put(i) for i in range(12)))
    assert [await store.get_bytes(k) for k in keys] == [k.encode() for k in keys]
    assert len(syncfs.calls) <= 5, f"{len(syncfs.calls)} syncfs calls for 12 writes under way together"
    assert not list((tmp_path / "store").rglob("*.tmp"))


async def test_a_lone_writer_never_waits_for_a_gather(tmp_path: Path, syncfs: Syncfs,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from sidecar.storage import file as file_store

    monkeypatch.setattr(file_store, "GATHER", 60.0)  # were any write to wait for one, the test would time out
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("first", b"makes the root")
    syncfs.calls.clear()
    async with asyncio.timeout(20):
        for i in range(5):
            await store.put_bytes(f"c/db/ltx/0/{i:016x}.ltx", b"x", if_none_match=True)
    assert len(syncfs.calls) == 10  # its data, then its name, each write


def test_each_sync_waits_for_a_syncfs_begun_after_it(tmp_path: Path, syncfs: Syncfs) -> None:
    group = GroupSync.open(tmp_path)
    assert group is not None
    spans: list[tuple[float, float]] = []

    def writer() -> None:
        for _ in range(20):
            called = time.monotonic()
            group.sync()
            spans.append((called, time.monotonic()))

    threads = [threading.Thread(target=writer) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    group.close()
    assert len(spans) == 120
    assert len(syncfs.calls) < 120, "no two writers shared a syncfs"
    for called, returned in spans:
        assert any(called <= start and end <= returned for start, end in syncfs.calls), \
            "a sync returned without a syncfs that began after it was called"


async def test_a_failed_syncfs_fails_the_write_and_stores_nothing(tmp_path: Path, syncfs: Syncfs) -> None:
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("c/db/head.json", b"{}")
    syncfs.fail = 1
    with pytest.raises(StorageError, match=r"write failed: .*syncfs") as err:
        await store.put_bytes("c/db/ltx/0/0000000000000001-0000000000000001.ltx", b"x", if_none_match=True)
    assert "0000000000000001-0000000000000001.ltx" in str(err.value)
    with pytest.raises(NotFound):
        await store.get_bytes("c/db/ltx/0/0000000000000001-0000000000000001.ltx")
    assert not list((tmp_path / "store").rglob("*.tmp"))
    # the next write, once the disk answers again, is stored
    await store.put_bytes("c/db/ltx/0/0000000000000001-0000000000000001.ltx", b"x", if_none_match=True)
    assert await store.get_bytes("c/db/ltx/0/0000000000000001-0000000000000001.ltx") == b"x"


async def test_a_directory_on_another_file_system_is_fsynced_instead(tmp_path: Path, syncfs: Syncfs) -> None:
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no other file system to mount below the store")
    elsewhere = Path(os.path.realpath(shm)) / f"litefs-sidecar-test-{os.getpid()}-{time.monotonic_ns()}"
    elsewhere.mkdir()
    try:
        store = FileStorage(tmp_path / "store")
        await store.put_bytes("here", b"1")
        (tmp_path / "store" / "there").symlink_to(elsewhere)
        syncfs.calls.clear()
        await store.put_bytes("there/object", b"2")
        await store.put_file("there/copied", tmp_path / "store" / "here")
        assert (elsewhere / "object").read_bytes() == b"2"
        assert (elsewhere / "copied").read_bytes() == b"1"
        assert syncfs.calls == [], "a syncfs of the store's file system does not cover another one"
    finally:
        for p in elsewhere.iterdir():
            p.unlink()
        elsewhere.rmdir()


async def test_a_write_cancelled_while_it_waits_stores_nothing(tmp_path: Path, syncfs: Syncfs) -> None:
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("c/db/head.json", b"{}")
    syncfs.delay = 0.3
    syncfs.began.clear()
    write = asyncio.create_task(store.put_bytes("c/db/ltx/0/a.ltx", b"a", if_none_match=True))
    assert await asyncio.to_thread(syncfs.began.wait, 10)  # its data's syncfs has begun
    write.cancel()
    with pytest.raises(asyncio.CancelledError):
        await write
    syncfs.delay = 0.0
    await store.put_bytes("c/db/ltx/0/b.ltx", b"b", if_none_match=True)
    assert await store.get_bytes("c/db/ltx/0/b.ltx") == b"b"
    with pytest.raises(NotFound):
        await store.get_bytes("c/db/ltx/0/a.ltx")
    assert not list((tmp_path / "store").rglob("*.tmp"))


async def test_a_closed_store_writes_again(tmp_path: Path, syncfs: Syncfs) -> None:
    store = FileStorage(tmp_path / "store")
    await store.put_bytes("one", b"1")
    await store.close()
    syncfs.calls.clear()
    await store.put_bytes("two", b"2")
    assert await store.get_bytes("two") == b"2"
    assert len(syncfs.calls) == 2, "the data, then the name"
    await store.close()
