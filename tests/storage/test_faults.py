"""S3 through a proxy that answers SlowDown, fails, or cuts bodies mid-way: retries and resumes."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sidecar.errors import ConditionalWritesIgnored, ConfigError, NotFound, PreconditionFailed, StorageError
from sidecar.storage.s3 import S3Storage
from tests.faults import FaultProxy
from tests.s3server import MotoServer


@pytest.fixture
async def proxied(moto_server: MotoServer) -> AsyncIterator[tuple[S3Storage, FaultProxy]]:
    proxy = FaultProxy(moto_server.url)
    url = await proxy.start()
    bucket = moto_server.create_bucket()
    store = S3Storage(bucket, "p", endpoint_url=url, force_path_style=True, backoff_base=0.001, backoff_cap=0.01,
                      max_attempts=6)
    yield store, proxy
    await store.close()
    await proxy.stop()


async def test_slowdown_every_third_request_is_retried(proxied: tuple[S3Storage, FaultProxy]) -> None:
    store, proxy = proxied
    proxy.faults.slowdown_every = 3
    for i in range(10):
        await store.put_bytes(f"k{i}", f"v{i}".encode())
    assert [o.key for o in await store.list("")] == [f"k{i}" for i in range(10)]
    assert all([await store.get_bytes(f"k{i}") == f"v{i}".encode() for i in range(10)])
    assert proxy.injected >= 6


async def test_get_cut_mid_body_resumes(proxied: tuple[S3Storage, FaultProxy], tmp_path: Path) -> None:
    store, proxy = proxied
    data = os.urandom(200_000)
    await store.put_bytes("obj", data)
    proxy.faults.cut_gets, proxy.faults.cut_after = 2, 50_000
    assert await store.get_bytes("obj") == data
    proxy.faults.cut_gets = 3
    await store.download("obj", tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == data
    assert proxy.injected == 5


async def test_persistent_failure_is_retryable_error_and_writes_nothing(
        proxied: tuple[S3Storage, FaultProxy], tmp_path: Path) -> None:
    store, proxy = proxied
    proxy.faults.down = True
    with pytest.raises(StorageError, match="k") as err:
        await store.put_bytes("k", b"v")
    assert err.value.retryable
    with pytest.raises(StorageError):
        await store.download("k", tmp_path / "k")
    assert not (tmp_path / "k").exists()
    proxy.faults.down = False
    assert await store.list("") == []


async def test_a_missing_bucket_is_named_not_taken_for_a_missing_object(moto_server: MotoServer) -> None:
    """S3 answers 404 NoSuchBucket for a bucket that does not exist: a configuration error to name, not an object
    that is absent (read as 'no backup', or as a conditional write lost to another writer)."""
    store = S3Storage("no-such-bucket-here", "p", endpoint_url=moto_server.url, force_path_style=True,
                      backoff_base=0.001, backoff_cap=0.01, max_attempts=2)
    try:
        for name, op in [("get", lambda: store.get_bytes("k")), ("list", lambda: store.list("")),
                         ("put", lambda: store.put_bytes("k", b"x")),
                         ("create", lambda: store.put_bytes("k", b"x", if_none_match=True)),
                         ("delete", lambda: store.delete(["k"]))]:
            with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket-here' does not exist") as err:
                await op()
            assert not isinstance(err.value, NotFound | PreconditionFailed), name
            assert not err.value.retryable, name
    finally:
        await store.close()


async def test_a_read_resumed_after_a_drop_never_splices_in_a_replacement(
        proxied: tuple[S3Storage, FaultProxy]) -> None:
    """The object is replaced between a read's first GET and the ranged GET that resumes it after a drop: the read
    fails (retryable) rather than returning the old object's start followed by the new one's end."""
    store, proxy = proxied
    old, new = b"a" * 5000, b"b" * 5000
    await store.put_bytes("head.json", old)
    proxy.faults.cut_gets, proxy.faults.cut_after = 1, 1000
    got = b""
    with pytest.raises(StorageError, match="changed while it was read") as err:
        async for chunk in store.stream("head.json", chunk_size=100):
            if not got:
                await store.put_bytes("head.json", new)
            got += chunk
    assert err.value.retryable
    assert got == old[:len(got)]
    assert proxy.injected == 1


async def test_the_conditional_writes_check_passes_on_moto_leaves_nothing_and_runs_once(
        proxied: tuple[S3Storage, FaultProxy]) -> None:
    store, proxy = proxied
    await store.check_conditional_writes()
    assert await store.list("") == []  # the scratch object is deleted
    before = proxy.requests
    await store.check_conditional_writes()
    assert proxy.requests == before  # once per store object: no cost after start


async def test_an_endpoint_that_ignores_conditional_writes_is_refused(proxied: tuple[S3Storage, FaultProxy]) -> None:
    store, proxy = proxied
    proxy.faults.strip_conditions = True
    await store.put_bytes("k", b"first")
    await store.put_bytes("k", b"second", if_none_match=True)  # the danger: a write-once object replaced, silently
    assert await store.get_bytes("k") == b"second"
    await store.delete(["k"])
    for _ in range(2):  # never remembered as passed
        with pytest.raises(ConditionalWritesIgnored) as err:
            await store.check_conditional_writes()
        assert err.value.ignored == ["If-None-Match", "If-Match"]
        assert isinstance(err.value, ConfigError) and not isinstance(err.value, StorageError)  # exit 2, not retried
        assert f"storage {store.url} (S3 endpoint {proxy.url}): the endpoint ignores If-None-Match and If-Match" \
               in str(err.value)
        assert "leases and write-once files cannot be enforced" in str(err.value)
        assert await store.list("") == []  # the scratch object is deleted all the same
    proxy.faults.strip_conditions = False
    await store.check_conditional_writes()


async def test_a_store_failing_during_the_check_is_a_retryable_storage_error(
        proxied: tuple[S3Storage, FaultProxy]) -> None:
    store, proxy = proxied
    proxy.faults.down = True
    with pytest.raises(StorageError) as err:
        await store.check_conditional_writes()
    assert err.value.retryable and not isinstance(err.value, ConditionalWritesIgnored)
    proxy.faults.down = False
    await store.check_conditional_writes()  # checked again once the store answers
    assert await store.list("") == []
