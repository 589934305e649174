"""Property: whatever the interleaving of new files, uploads, HWM replies and prune ticks, the sidecar never
deletes a file above the HWM upstream confirmed, nor the newest file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.daemon.local import LocalDB, prune_victims
from sidecar.daemon.ship import DbShipper
from sidecar.ltx import format_filename

ops = st.lists(st.one_of(
    st.tuples(st.just("commit"), st.integers(1, 5)),        # LiteFS writes n per-transaction files
    st.tuples(st.just("upload"), st.integers(1, 8)),        # the sidecar ships up to n more files
    st.tuples(st.just("hwm"), st.integers(0, 100)),         # upstream confirms a durable prefix of what it got
    st.tuples(st.just("prune"), st.integers(0, 30)),        # a tick, after this many seconds
    st.tuples(st.just("rescan"), st.just(0)),
    st.tuples(st.just("pack"), st.just(0)),                 # the shipped files below the HWM are packed
), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, retention=st.integers(0, 20), offset=st.integers(-3, 3))
def test_nothing_above_the_hwm_is_ever_deleted(ops: list[tuple[str, int]], retention: int, offset: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ltx = Path(tmp)
        local = LocalDB("db", ltx)
        shipper = DbShipper("db", local, upstream=None, node=None, state_path=ltx / "state.json")  # type: ignore[arg-type]
        shipper.link.offset = offset  # upstream counts TXIDs `offset` ahead (after an import)
        now, head, shipped, durable = 1000.0, 0, 0, 0  # local TXIDs
        for op, n in ops:
            if op == "commit":
                for _ in range(n):
                    head += 1
                    path = ltx / format_filename(head, head)
                    path.write_bytes(b"")
                    os.utime(path, (now, now))
                    local.add(path)
            elif op == "upload":
                shipped = min(head, shipped + n)
            elif op == "hwm":
                durable = min(shipped, max(durable, n))  # only what was shipped can be confirmed; it only rises
                shipper.hwm = durable + offset if durable else None
            elif op == "rescan":
                local.scan()
            elif op == "pack":
                if shipper.local_hwm is not None:
                    local.pack(below=shipper.local_hwm)
            else:
                now += n
                before = {f.max_txid for f in local.sorted()}
                victims = prune_victims(local.oldest(), shipper.local_hwm, now, retention)
                local.delete(victims)
                for f in victims:
                    assert f.max_txid <= durable, f"deleted {f.max_txid:x} above the HWM {durable:x}"
                    assert f.max_txid != max(before), "deleted the newest file"
                    assert f.mtime < now - retention
                assert {int(p.name[17:33], 16) for p in ltx.glob("*.ltx")} == {f.max_txid for f in local.sorted()}
