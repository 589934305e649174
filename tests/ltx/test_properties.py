"""Hypothesis properties of the codec: round trips, compaction equals sequential apply, gaps refused."""

from __future__ import annotations

import io
import os
import tempfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.ltx import FLAG_COMPRESS_LZ4, FLAG_NO_CHECKSUM, CompactionError, Header, LTXError, Version
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import decode
from sidecar.ltx.encoder import encode
from sidecar.ltx.sqlite import apply_files, database_checksum_of
from tests.ltx.chain import PAGE, build_chain, checksum

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

page_sets = st.dictionaries(st.integers(1, 40), st.binary(min_size=PAGE, max_size=PAGE), max_size=12)


@SETTINGS
@given(pages=page_sets, txid=st.integers(2, 2**40), ts=st.integers(0, 2**45), node=st.integers(0, 2**63),
       kind=st.sampled_from(["v2", "v2-lz4", "v3", "v3-nochecksum"]))
def test_decode_inverts_encode(pages: dict[int, bytes], txid: int, ts: int, node: int, kind: str) -> None:
    version = Version.V3 if kind.startswith("v3") else Version.V2
    flags = {"v2": 0, "v2-lz4": FLAG_COMPRESS_LZ4, "v3": 0, "v3-nochecksum": FLAG_NO_CHECKSUM}[kind]
    commit = max(pages, default=0) + 3
    no_ck = bool(flags & FLAG_NO_CHECKSUM)
    header = Header(page_size=PAGE, commit=commit, min_txid=txid, max_txid=txid + 5, timestamp=ts,
                    pre_apply_checksum=0 if no_ck else (1 << 63) | 12345, flags=flags, node_id=node)
    items = sorted(pages.items())
    post = 0 if no_ck else (1 << 63) | 999
    data = encode(header, items, version, post)
    h2, p2, t2 = decode(data, version)
    assert h2 == header
    assert p2 == items
    assert t2.post_apply_checksum == post


txs_strategy = st.lists(
    st.tuples(st.integers(1, 30), st.dictionaries(st.integers(1, 30), st.integers(0, 255), max_size=8)),
    min_size=2, max_size=8)


def apply_to_file(files: list[bytes], version: Version) -> tuple[bytes, int]:
    fd, path = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "w+b") as f:
            apply_files(f, files, version)
            f.seek(0)
            data = f.read()
            ck = database_checksum_of(f, PAGE)[0] if data else 0
        return data, ck
    finally:
        os.unlink(path)


@SETTINGS
@given(txs=txs_strategy, lz4=st.booleans(), split=st.integers(0, 7), out_v3=st.booleans())
def test_apply_of_compaction_equals_sequential_apply(txs: list[tuple[int, dict[int, int]]], lz4: bool, split: int,
                                                     out_v3: bool) -> None:
    files, model = build_chain(txs, lz4=lz4)
    seq_db, seq_ck = apply_to_file(files, Version.V2)
    expect = b"".join(model[p] for p in range(1, max(model, default=0) + 1))
    assert seq_db == expect and seq_ck == checksum(model)
    # Compact the tail (from `split`), or everything, and apply: same bytes, same checksum.
    split = min(split, len(files) - 1)
    out = io.BytesIO()
    version = Version.V3 if out_v3 else Version.V2
    h, t = compact(files[split:], out, version=Version.V2, out_version=version, flags=0)
    assert (h.min_txid, h.max_txid) == (split + 1, len(files))
    assert t.post_apply_checksum == checksum(model)
    head = apply_to_file(files[:split], Version.V2)[0] if split else b""
    fd, path = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "w+b") as f:
            f.write(head)
            f.flush()
            from sidecar.ltx.sqlite import Applier
            from sidecar.ltx.types import Pos
            pos = Pos(split, checksum_of_prefix(files, split)) if split else None
            Applier(f, pos).apply(out.getvalue(), version)
            f.seek(0)
            assert f.read() == seq_db
    finally:
        os.unlink(path)


def checksum_of_prefix(files: list[bytes], n: int) -> int:
    return decode(files[n - 1], Version.V2)[2].post_apply_checksum


@SETTINGS
@given(txs=txs_strategy, drop=st.integers(1, 6))
def test_compaction_refuses_gaps(txs: list[tuple[int, dict[int, int]]], drop: int) -> None:
    files, _ = build_chain([*txs, (5, {1: 1})])
    drop = min(drop, len(files) - 2)
    gappy = files[:drop] + files[drop + 1:]
    with pytest.raises(CompactionError, match="non-contiguous"):
        compact(gappy, io.BytesIO(), version=Version.V2)
    with pytest.raises(LTXError):
        apply_to_file(gappy, Version.V2)


def test_compaction_refuses_checksum_break() -> None:
    a, _ = build_chain([(3, {1: 1}), (3, {2: 2})])
    b, _ = build_chain([(3, {1: 9}), (3, {2: 2}), (4, {4: 4})])
    with pytest.raises(CompactionError, match="pre-apply checksum"):
        compact([a[0], b[1], b[2]], io.BytesIO(), version=Version.V2)


def test_compaction_refuses_mixed_page_sizes() -> None:
    a, _ = build_chain([(3, {1: 1})])
    b, _ = build_chain([(3, {1: 1}), (3, {2: 1})], size=1024)
    with pytest.raises(CompactionError, match="page size"):
        compact([a[0], b[1]], io.BytesIO(), version=Version.V2)


def test_compaction_truncates_when_commit_shrinks() -> None:
    files, model = build_chain([(10, {}), (10, {9: 3}), (4, {2: 7})])
    out = io.BytesIO()
    h, _ = compact(files, out, version=Version.V2)
    _, pages, _ = decode(out.getvalue(), Version.V2)
    assert h.commit == 4
    assert [p for p, _ in pages] == [1, 2, 3, 4]
    assert dict(pages) == model
