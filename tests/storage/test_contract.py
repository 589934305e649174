"""One contract, both stores: a local directory and S3 (moto's server over HTTP)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.errors import NotFound, PreconditionFailed, StorageError
from sidecar.storage import FILE_LAYOUT, S3_LAYOUT, LTXKey, Storage, open_storage
from sidecar.storage.file import FileStorage
from sidecar.storage.s3 import S3Storage
from tests.s3server import MotoServer


@pytest.fixture(params=["file", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Storage]:
    if request.param == "file":
        s: Storage = open_storage(f"file://{tmp_path / 'store'}")
    else:
        server: MotoServer = request.getfixturevalue("moto_server")
        bucket = server.create_bucket()
        s = open_storage(f"s3://{bucket}/some/prefix", endpoint_url=server.url, force_path_style=True,
                         multipart_threshold=5 << 20, part_size=5 << 20)
    yield s
    await s.close()


class TestContract:
    async def test_put_get_list_delete(self, store: Storage) -> None:
        await store.put_bytes("a/b/one.ltx", b"one", timestamp=1_700_000_000_123)
        await store.put_bytes("a/two.ltx", b"two" * 1000)
        await store.put_bytes("z.ltx", b"")
        assert await store.get_bytes("a/b/one.ltx") == b"one"
        keys = [o.key for o in await store.list("")]
        assert keys == ["a/b/one.ltx", "a/two.ltx", "z.ltx"]
        assert [o.key for o in await store.list("a/")] == ["a/b/one.ltx", "a/two.ltx"]
        assert [(o.key, o.size) for o in await store.list("a/two")] == [("a/two.ltx", 3000)]
        await store.delete(["a/b/one.ltx", "missing.ltx"])
        assert [o.key for o in await store.list("")] == ["a/two.ltx", "z.ltx"]
        with pytest.raises(NotFound, match=r"a/b/one\.ltx"):
            await store.get_bytes("a/b/one.ltx")

    async def test_a_prefix_whose_objects_are_all_deleted_is_gone(self, store: Storage, tmp_path: Path) -> None:
        """As on S3, so on disk: deleting a database's every file leaves no empty directory that a listing of
        the store's root (or `verify` of it) would take for a database; and the prefix can be written again."""
        keys = ["c/app.db/ltx/0/0000000000000001-0000000000000001.ltx", "c/app.db/head.json",
                "c/keep.db/ltx/0/0000000000000001-0000000000000001.ltx"]
        for key in keys:
            await store.put_bytes(key, b"x")
        await store.delete(keys[:2])
        assert [o.key for o in await store.list("c/")] == keys[2:]
        if isinstance(store, FileStorage):
            assert sorted(p.name for p in (tmp_path / "store" / "c").iterdir()) == ["keep.db"]
        await store.put_bytes(keys[0], b"again", if_none_match=True)
        assert await store.get_bytes(keys[0]) == b"again"

    async def test_timestamp_where_litestream_reads_it(self, store: Storage) -> None:
        await store.put_bytes("ltx/0/x.ltx", b"data", timestamp=1_700_000_000_123)
        info = await store.head("ltx/0/x.ltx")
        assert info.timestamp == 1_700_000_000_123 and info.size == 4

    async def test_get_if_changed_is_a_conditional_get(self, store: Storage) -> None:
        with pytest.raises(NotFound, match=r"head\.json"):
            await store.get_if_changed("db/head.json", None)
        await store.put_bytes("db/head.json", b"one")
        got = await store.get_if_changed("db/head.json", None)
        assert got is not None and got[0] == b"one"
        assert await store.get_if_changed("db/head.json", got[1]) is None
        await store.put_bytes("db/head.json", b"two")
        again = await store.get_if_changed("db/head.json", got[1])
        assert again is not None and again[0] == b"two" and again[1] != got[1]
        assert await store.get_if_changed("db/head.json", again[1]) is None
        await store.delete(["db/head.json"])
        with pytest.raises(NotFound):
            await store.get_if_changed("db/head.json", again[1])

    async def test_ranges_streams_and_downloads(self, store: Storage, tmp_path: Path) -> None:
        data = os.urandom(300_000)
        src = tmp_path / "src"
        src.write_bytes(data)
        await store.put_file("big.bin", src)
        assert await store.get_range("big.bin", 100, 50) == data[100:150]
        assert await store.get_range("big.bin", len(data) - 10, 50) == data[-10:]
        chunks = [c async for c in store.stream("big.bin", chunk_size=65536)]
        assert b"".join(chunks) == data
        n = await store.download("big.bin", tmp_path / "copy")
        assert n == len(data) and (tmp_path / "copy").read_bytes() == data
        with pytest.raises(NotFound):
            await store.download("nope.bin", tmp_path / "nope")
        assert not (tmp_path / "nope").exists()

    async def test_an_empty_object_and_ranges_from_the_end_read_as_empty(self, store: Storage, tmp_path: Path) -> None:
        """S3 answers 416 to a range starting at or past an object's end, even `bytes=0-` of an empty object:
        that is an empty read, as from a file, not a failure."""
        await store.put_bytes("empty.ltx", b"")
        await store.put_bytes("ten.ltx", b"0123456789")
        assert await store.get_bytes("empty.ltx") == b""
        assert [c async for c in store.stream("empty.ltx")] == []
        assert await store.get_range("empty.ltx", 0, 100) == b""
        assert await store.download("empty.ltx", tmp_path / "empty") == 0
        assert (tmp_path / "empty").read_bytes() == b""
        assert await store.get_range("ten.ltx", 10, 5) == b""
        assert await store.get_range("ten.ltx", 20, 5) == b""

    async def test_large_file_round_trips(self, store: Storage, tmp_path: Path) -> None:
        data = os.urandom(11 << 20)  # two full 5 MiB parts and a tail on S3
        src = tmp_path / "large"
        src.write_bytes(data)
        await store.put_file("large.ltx", src, timestamp=1_700_000_000_000)
        assert await store.get_bytes("large.ltx") == data
        if isinstance(store, S3Storage):
            before = store.requests
            await store.put_file("large2.ltx", src)
            assert store.requests - before >= 4  # create, 3 parts, complete: multipart

    async def test_keys_cannot_escape(self, store: Storage) -> None:
        for key in ("../x", "/abs", "a/../../x", "a\x00b", ""):
            with pytest.raises(StorageError):
                await store.put_bytes(key, b"x")


    async def test_if_none_match_creates_only_once(self, store: Storage) -> None:
        etag = await store.put_bytes("c/db/one.ltx", b"first", if_none_match=True)
        assert etag and (await store.head("c/db/one.ltx")).etag == etag
        with pytest.raises(PreconditionFailed, match=r"one\.ltx"):
            await store.put_bytes("c/db/one.ltx", b"second", if_none_match=True)
        assert await store.get_bytes("c/db/one.ltx") == b"first"

    async def test_if_match_replaces_only_the_expected_version(self, store: Storage) -> None:
        first = await store.put_bytes("lease", b"v1", if_none_match=True)
        second = await store.put_bytes("lease", b"v2", if_match=first)
        assert second != first
        with pytest.raises(PreconditionFailed):
            await store.put_bytes("lease", b"stale", if_match=first)  # a writer holding the old version loses
        assert await store.get_bytes("lease") == b"v2"
        with pytest.raises(PreconditionFailed):
            await store.put_bytes("absent", b"x", if_match=second)
        with pytest.raises(NotFound):
            await store.get_bytes("absent")

    async def test_the_conditional_writes_check_passes_and_leaves_nothing(self, store: Storage) -> None:
        """Both stores enforce conditional writes, so the start-up check passes (S3: by trying them on a scratch
        object), and it leaves no object behind that a listing could take for data."""
        await store.check_conditional_writes()
        await store.check_conditional_writes()
        assert await store.list("") == []

    async def test_conditional_get(self, store: Storage) -> None:
        etag = await store.put_bytes("head.json", b"one")
        got = await store.get_if_changed("head.json", None)
        assert got == (b"one", etag)
        assert await store.get_if_changed("head.json", etag) is None
        etag2 = await store.put_bytes("head.json", b"two")
        assert await store.get_if_changed("head.json", etag) == (b"two", etag2)
        with pytest.raises(NotFound):
            await store.get_if_changed("nothing.json", etag)

    async def test_local_files_read_what_is_stored(self, store: Storage, tmp_path: Path) -> None:
        await store.put_bytes("a/x.ltx", b"xx")
        await store.put_bytes("a/y.ltx", b"yyy")
        paths = await store.local_files(["a/x.ltx", "a/y.ltx"], tmp_path)
        assert [p.read_bytes() for p in paths] == [b"xx", b"yyy"]
        with pytest.raises(NotFound):
            await store.local_files(["a/missing.ltx"], tmp_path)


def test_layout_matches_litestream() -> None:
    assert FILE_LAYOUT.ltx_key("c/db", 0, 1, 2) == "c/db/ltx/0/0000000000000001-0000000000000002.ltx"
    assert S3_LAYOUT.ltx_key("c/db", 9, 1, 2) == "c/db/0009/0000000000000001-0000000000000002.ltx"
    assert FILE_LAYOUT.ltx_key("", 9, 1, 2) == "ltx/9/0000000000000001-0000000000000002.ltx"
    assert S3_LAYOUT.parse("c/db/000a/0000000000000001-0000000000000002.ltx") is None
    assert FILE_LAYOUT.parse("c/db/ltx/1/0000000000000003-0000000000000004.ltx") == LTXKey("c/db", 1, 3, 4)
    assert FILE_LAYOUT.parse("c/db/ltx/1/.0000000000000003-0000000000000004.ltx.tmp") is None
    assert S3_LAYOUT.head_key("c/db") == "c/db/head.json"


def test_bad_urls_are_config_errors() -> None:
    from sidecar.errors import ConfigError
    for url in ("ftp://x", "file://host/path", "s3://", "relative/path"):
        with pytest.raises(ConfigError, match="storage URL"):
            open_storage(url)
