"""Restore checks the database it built against the checksum stored for the target: files that are each valid but do
not add up to the stored state (a swapped file, a plan that skips one) are refused, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.engine import Engine, Levels, restore
from sidecar.errors import RestoreError
from sidecar.ltx import Version
from sidecar.ltx.decoder import Decoder
from tests.engine.history import History
from tests.invariants.conftest import ForkHistory, OpenEngine

DB = "app.db"


def update(h: History, row: int, letter: str) -> bytes:
    """One transaction rewriting one row in place (same length: no page is added), as the next upload."""
    h.con.execute("UPDATE events SET body = replace(body, 'e', ?) WHERE id = ?", (letter, row))
    return h.commit(int(h.pos.txid + 1) * 1000)


def stored_file(engine: Engine, txid: int) -> Path:
    """The store's level-0 file holding exactly TXID `txid`."""
    (path,) = (engine.state_dir.parent / "store").rglob(f"*{txid:016x}-{txid:016x}*")
    return path


def valid(path: Path) -> bool:
    dec = Decoder(path.read_bytes(), Version.V3)
    for _ in dec.pages():
        pass
    dec.close()  # the file checksum, and everything else a decoder checks
    return True


@pytest.fixture
async def swapped(history: History, fork: ForkHistory, open_engine: OpenEngine) -> Engine:
    """A store holding TXIDs 1 (snapshot), 2, 3 of one history, whose file for TXID 2 was swapped for the file for
    TXID 2 of another history that shares TXID 1: every file valid, the chain not what the checksums say."""
    history.write(n=300)
    snap = history.commit(1000)
    other = fork(history, "other.db")
    ours = [snap, update(history, 1, "a"), update(history, 300, "c")]
    theirs = [snap, update(other, 1, "b")]
    engine, elsewhere = await open_engine("a", Levels(l0_interval=0)), await open_engine("b", Levels(l0_interval=0))
    for data in ours:
        await engine.write_tx("c", DB, data)
    for data in theirs:
        await elsewhere.write_tx("c", DB, data)
    assert len(list(engine.index("c", DB))) == 3  # one level-0 file per upload
    assert engine.pos("c", DB).post_apply_checksum == history.checksums[3]
    stored_file(engine, 2).write_bytes(stored_file(elsewhere, 2).read_bytes())
    assert valid(stored_file(engine, 2)) and history.checksums[2] != other.checksums[2]
    return engine


class TestRestoreVerifiesTheFinalChecksum:
    """Valid files that do not add up are refused by the final database checksum, and nothing is written."""

    async def test_the_right_files_restore(self, tmp_path: Path, history: History, open_engine: OpenEngine) -> None:
        """The control: the same history, unswapped, restores at every TXID with its checksum verified."""
        history.write(n=300)
        engine = await open_engine("a", Levels(l0_interval=0))
        for data in (history.commit(1000), update(history, 1, "a"), update(history, 300, "c")):
            await engine.write_tx("c", DB, data)
        for txid in (1, 2, 3):
            result = await engine.restore_to("c", DB, tmp_path / f"{txid}.db", txid=txid)
            assert (result.checksum, result.verified) == (history.checksums[txid], True)

    @pytest.mark.parametrize("txid", [2, 3])
    async def test_a_swapped_file_is_refused(self, tmp_path: Path, swapped: Engine, history: History,
                                             txid: int) -> None:
        """Restoring through the swapped file fails on the checksum, whether it is the last file or not."""
        out = tmp_path / "out" / "restored.db"
        out.parent.mkdir()
        out.write_bytes(b"the database an operator had here")
        with pytest.raises(RestoreError, match=rf"checksum.*{history.checksums[txid]:016x}"):
            await swapped.restore_to("c", DB, out, txid=txid)
        assert out.read_bytes() == b"the database an operator had here"
        assert sorted(p.name for p in out.parent.iterdir()) == ["restored.db"]  # no temporary file left
        result = await swapped.restore_to("c", DB, tmp_path / "before.db", txid=1)  # before the swap: fine
        assert result.verified

    async def test_a_plan_that_skips_a_file_is_refused(self, tmp_path: Path, history: History,
                                                       open_engine: OpenEngine) -> None:
        """A wrong plan (TXID 2's file left out) gives a database the last file's checksum refuses."""
        history.write(n=300)
        engine = await open_engine("a", Levels(l0_interval=0))
        for data in (history.commit(1000), update(history, 1, "a"), update(history, 300, "c")):
            await engine.write_tx("c", DB, data)
        snap, _, last = sorted(engine.index("c", DB), key=lambda e: e.max_txid)
        out = tmp_path / "restored.db"
        with pytest.raises(RestoreError, match="checksum"):
            await restore(engine.storage, f"c/{DB}", [snap, last], out)
        assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
