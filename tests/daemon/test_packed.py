"""LocalDB's packed files (shipped per-transaction files kept as 16 bytes each): every question asked of a database
with packed files gets the answer the same database gives with none packed, whatever happens to the directory."""

from __future__ import annotations

import os
import tempfile
import tracemalloc
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.daemon.local import LocalDB, LocalFile, prune_victims
from sidecar.ltx import format_filename

commit = st.tuples(st.just("commit"), st.integers(1, 10))  # LiteFS writes n per-transaction files
ops = st.lists(st.one_of(
    commit, commit, commit,
    st.tuples(st.just("pack"), st.integers(0, 110)),      # pack below the HWM, this % of the head
    st.tuples(st.just("prune"), st.integers(0, 110)),     # prune at or below the HWM, this % of the head, a second on
    st.tuples(st.just("rescan"), st.just(0)),
    st.tuples(st.just("gone"), st.integers(0, 40)),       # someone else deletes a file (LiteFS's own retention)
    st.tuples(st.just("late"), st.integers(0, 40)),       # a file found late: put back under an old name
    st.tuples(st.just("snapshot"), st.just(0)),           # LiteFS replaces ltx/ with one snapshot file
), min_size=5, max_size=50)


def _view(f: LocalFile | None) -> tuple[int, int, float, int] | None:
    return None if f is None else (f.min_txid, f.max_txid, f.mtime, f.size)


def _same(packed: LocalDB, plain: LocalDB, probes: list[int]) -> None:
    assert [_view(f) for f in packed.sorted()] == [_view(f) for f in plain.sorted()]
    for db in (packed, plain):
        assert [_view(f) for f in db.newest()] == [_view(f) for f in plain.sorted()][::-1]  # sorted(), newest first
    assert packed.count == plain.count
    assert _view(packed.head) == _view(plain.head)
    for t in probes:
        assert packed.has(t) == plain.has(t)
        assert _view(packed.get(t)) == _view(plain.get(t))
        assert [_view(f) for f in packed.chain_from(t, 5)] == [_view(f) for f in plain.chain_from(t, 5)]
        assert [_view(f) for f in packed.chain_from(t, 9, 12)] == [_view(f) for f in plain.chain_from(t, 9, 12)]
        assert [_view(f) for f in packed.above(t)] == [_view(f) for f in plain.above(t)]
        above = plain.above(t)
        assert packed.backlog(t) == (len(above), sum(f.size for f in above), above[0].mtime if above else None)


def _write(ltx: Path, lo: int, hi: int, now: float) -> Path:
    path = ltx / format_filename(lo, hi)
    path.write_bytes(b"x" * (hi % 7))
    os.utime(path, (now, now))
    return path


@settings(max_examples=300, deadline=None)
@given(ops=ops)
def test_packed_files_answer_as_unpacked_ones(ops: list[tuple[str, int]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ltx = Path(tmp)
        packed, plain = LocalDB("db", ltx), LocalDB("db", ltx)
        now, head, deleted = 1000.0, 0, set[int]()
        for op, n in ops:
            if op == "commit":
                for _ in range(n):
                    head += 1
                    now += 0.25
                    path = _write(ltx, head, head, now)
                    packed.add(path)
                    plain.add(path)
            elif op == "pack":
                packed.pack(below=head * n // 100)
            elif op == "prune":
                now += 1
                hwm = head * n // 100
                victims = prune_victims(packed.oldest(), hwm, now, 0.5)
                assert [_view(f) for f in victims] == [_view(f) for f in prune_victims(plain.oldest(), hwm, now, 0.5)]
                packed.delete(victims)
                plain.delete([plain.get(f.max_txid) or f for f in victims])
                deleted |= {f.max_txid for f in victims}
            elif op == "rescan":
                packed.scan()
                plain.scan()
            elif op == "gone":
                path = ltx / format_filename(n, n)
                if path.exists():
                    path.unlink()
                    packed.discard(path)
                    plain.discard(path)
            elif op == "late" and 0 < n <= head and n in deleted:
                deleted.discard(n)
                path = _write(ltx, n, n, now)
                packed.add(path)
                plain.add(path)
            elif op == "snapshot" and head:
                for p in ltx.glob("*.ltx"):
                    p.unlink()
                _write(ltx, 1, head, now)
                packed.scan()
                plain.scan()
            _same(packed, plain, [0, 1, 2, head // 2, head - 1, head, head + 1])
            assert {int(p.name[17:33], 16) for p in ltx.glob("*.ltx")} == {f.max_txid for f in plain.sorted()}


def test_a_packed_file_takes_a_tenth_of_the_memory(tmp_path: Path) -> None:
    n = 20_000

    def made(t: int) -> LocalFile:
        return LocalFile(str(tmp_path), t, t, 1_700_000_000.0 + t / 1000, 3_000 + t % 500)

    tracemalloc.start()
    local = LocalDB("db", tmp_path, {t: made(t) for t in range(1, n + 1)})
    held = tracemalloc.get_traced_memory()[0]
    local.pack(below=n)
    packed = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert local.count == n and len(local.packed) == n - 1
    assert packed * 10 < held, (packed, held)
    assert local.chain_from(1, 3) == [made(1), made(2), made(3)]
    assert local.get(n) is local.files[n] and local.get(n - 1) == made(n - 1)


def test_a_chain_stops_before_its_files_pass_the_byte_limit(tmp_path: Path) -> None:
    sizes = {1: 10, 2: 10, 3: 10, 4: 50, 5: 10}
    plain, packed = (LocalDB("db", tmp_path, {t: LocalFile(str(tmp_path), t, t, 0.0, n) for t, n in sizes.items()})
                     for _ in range(2))
    assert packed.pack(below=5) == 4
    for db in (plain, packed):
        assert [f.max_txid for f in db.chain_from(1, 100, 25)] == [1, 2]
        assert [f.max_txid for f in db.chain_from(1, 100, 30)] == [1, 2, 3]
        assert [f.max_txid for f in db.chain_from(4, 100, 25)] == [4]  # a first file larger than the limit goes alone
        assert [f.max_txid for f in db.chain_from(3, 100, 65)] == [3, 4]
        assert [f.max_txid for f in db.chain_from(1, 2, 1000)] == [1, 2]
        assert [f.max_txid for f in db.chain_from(1, 100)] == [1, 2, 3, 4, 5]
