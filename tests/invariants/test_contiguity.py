"""The upload contiguity rule, each half on its own: an upload continues the position only if its min TXID is the
position's TXID + 1 AND its pre-apply checksum is the position's post-apply checksum (snapshots are the exception).

Each refused upload differs from an accepted one in one half of the rule only, so dropping either half from the
check lets exactly one of these tests through.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest

from sidecar.engine import Levels
from sidecar.errors import PosMismatch
from sidecar.ltx import Pos, Version
from sidecar.ltx.decoder import decode
from tests.engine.history import History
from tests.invariants.conftest import Files, ForkHistory, OpenEngine, Renumber, SnapshotOf
from tests.server.conftest import TOKEN, Running

DB = "app.db"


def head(data: bytes) -> tuple[int, int, int]:
    h = decode(data, Version.V2)[0]
    return h.min_txid, h.max_txid, h.pre_apply_checksum


def ship(history: History, n: int) -> list[bytes]:
    """`n` transactions of the live database as uploads, the first a snapshot when the history is new."""
    out = []
    for _ in range(n):
        history.write()
        out.append(history.commit(int(history.pos.txid + 1) * 1000))
    return out


class TestEngine:
    """Through `Engine.write_tx`: the refused upload leaves the position, the upload log and the store as they were."""

    async def test_next_txid_from_a_diverged_history_is_refused(self, tmp_path: Path, history: History,
                                                               fork: ForkHistory, open_engine: OpenEngine,
                                                               files: Files) -> None:
        """Right next TXID, another history's pre-apply checksum (a primary that diverged in a failover): refused."""
        engine = await open_engine("a", Levels(l0_interval=3600))
        shared = ship(history, 2)
        other = fork(history, "other.db")  # the two primaries agree up to TXID 2, then each writes its own 3
        ours = ship(history, 1)
        theirs = ship(other, 2)
        for data in shared + ours:
            await engine.write_tx("c", DB, data)
        pos = engine.pos("c", DB)
        assert pos == history.pos == Pos(3, history.checksums[3])
        diverged = theirs[1]  # TXID 4 on top of the other primary's 3
        min_txid, _, pre = head(diverged)
        assert min_txid == pos.txid + 1 and pre == other.checksums[3] != pos.post_apply_checksum
        before = files(tmp_path / "a")
        with pytest.raises(PosMismatch) as err:
            await engine.write_tx("c", DB, diverged)
        assert err.value.pos == pos
        assert engine.pos("c", DB) == pos and engine.status("c", DB).pending_files == 3
        assert files(tmp_path / "a") == before  # not in the upload log, not in the store
        # The same upload continues the history it belongs to: only its checksum was wrong here.
        again = await open_engine("b", Levels(l0_interval=3600))
        for data in shared + theirs:
            await again.write_tx("c", DB, data)
        assert again.pos("c", DB) == other.pos
        # And a crash now replays only what was accepted.
        engine.abandon()
        reopened = await open_engine("a", Levels(l0_interval=3600))
        assert reopened.pos("c", DB) == pos

    @pytest.mark.parametrize("skip", [1, 2, 1000])
    async def test_txid_gap_with_the_right_checksum_is_refused(self, tmp_path: Path, history: History,
                                                              open_engine: OpenEngine, renumber: Renumber,
                                                              files: Files, skip: int) -> None:
        """A min TXID beyond position + 1, with the pre-apply checksum that does continue the position: refused."""
        engine = await open_engine("a", Levels(l0_interval=3600))
        for data in ship(history, 3):
            await engine.write_tx("c", DB, data)
        pos = engine.pos("c", DB)
        nxt = ship(history, 1)[0]
        gap = renumber(nxt, pos.txid + 1 + skip)
        min_txid, _, pre = head(gap)
        assert min_txid == pos.txid + 1 + skip and pre == pos.post_apply_checksum
        before = files(tmp_path / "a")
        with pytest.raises(PosMismatch) as err:
            await engine.write_tx("c", DB, gap)
        assert err.value.pos == pos
        assert engine.pos("c", DB) == pos and engine.status("c", DB).pending_files == 3
        assert files(tmp_path / "a") == before
        await engine.write_tx("c", DB, nxt)  # the same pages at the right TXID continue
        assert engine.pos("c", DB) == history.pos

    async def test_a_txid_already_held_with_the_right_checksum_is_refused(self, history: History,
                                                                        open_engine: OpenEngine,
                                                                        renumber: Renumber) -> None:
        """A min TXID at or below the position, even with the position's checksum, is refused (no overwrite)."""
        engine = await open_engine("a", Levels(l0_interval=3600))
        for data in ship(history, 3):
            await engine.write_tx("c", DB, data)
        pos = engine.pos("c", DB)
        nxt = ship(history, 1)[0]
        for min_txid in (pos.txid, 2):
            with pytest.raises(PosMismatch):
                await engine.write_tx("c", DB, renumber(nxt, min_txid))
        assert engine.pos("c", DB) == pos

    async def test_a_snapshot_ahead_is_accepted_whatever_its_history(self, history: History, fork: ForkHistory,
                                                                    open_engine: OpenEngine,
                                                                    snapshot_of: SnapshotOf) -> None:
        """Snapshots are the exception: one beyond the position replaces it; one at or behind it is refused."""
        engine = await open_engine("a", Levels(l0_interval=3600))
        for data in ship(history, 3):
            await engine.write_tx("c", DB, data)
        pos = engine.pos("c", DB)
        with pytest.raises(PosMismatch, match="not ahead"):
            await engine.write_tx("c", DB, snapshot_of(history, pos.txid))
        ahead = fork(history, "ahead.db")
        ship(ahead, 2)
        snap = snapshot_of(ahead, ahead.pos.txid)
        assert head(snap)[:2] == (1, pos.txid + 2)
        await engine.write_tx("c", DB, snap)
        assert engine.pos("c", DB) == ahead.pos


async def post_tx(http: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, dict[str, object]]:
    async with http.post(f"{url}/db/tx", params={"db": DB}, data=data, headers={"Authorization": TOKEN}) as resp:
        return resp.status, (await resp.json() if resp.status != 200 else {"hwm": resp.headers["Litefs-Hwm"]})


async def pos_map(http: aiohttp.ClientSession, url: str) -> object:
    async with http.get(f"{url}/pos", headers={"Authorization": TOKEN}) as resp:
        assert resp.status == 200
        return await resp.json()


def pos_json(pos: Pos) -> dict[str, str]:
    return {"txid": f"{pos.txid:016x}", "postApplyChecksum": f"{pos.post_apply_checksum:016x}"}


class TestHTTP:
    """Through `POST /db/tx` on a real server: 409 EPOSMISMATCH with the server's position, nothing stored."""

    async def test_next_txid_from_a_diverged_history_gets_409(self, server: Running, http: aiohttp.ClientSession,
                                                              history: History, fork: ForkHistory,
                                                              files: Files) -> None:
        """Right next TXID, another history's pre-apply checksum: 409, and the store is unchanged."""
        shared = ship(history, 2)
        other = fork(history, "other.db")
        for data in [*shared, *ship(history, 1)]:
            assert (await post_tx(http, server.url, data))[0] == 200
        diverged = ship(other, 2)[1]
        assert head(diverged)[0] == history.pos.txid + 1
        before = files(server.root / "store")
        status, body = await post_tx(http, server.url, diverged)
        assert status == 409 and body["code"] == "EPOSMISMATCH" and body["pos"] == pos_json(history.pos), body
        assert await pos_map(http, server.url) == {DB: pos_json(history.pos)}
        assert files(server.root / "store") == before

    async def test_txid_gap_with_the_right_checksum_gets_409(self, server: Running, http: aiohttp.ClientSession,
                                                             history: History, renumber: Renumber,
                                                             files: Files) -> None:
        """A forward TXID gap whose pre-apply checksum does continue the position: 409, and the store is unchanged."""
        for data in ship(history, 3):
            assert (await post_tx(http, server.url, data))[0] == 200
        pos = history.pos
        nxt = ship(history, 1)[0]
        gap = renumber(nxt, pos.txid + 2)
        assert head(gap)[2] == pos.post_apply_checksum
        before = files(server.root / "store")
        status, body = await post_tx(http, server.url, gap)
        assert status == 409 and body["code"] == "EPOSMISMATCH" and body["pos"] == pos_json(pos), body
        assert await pos_map(http, server.url) == {DB: pos_json(pos)}
        assert files(server.root / "store") == before
        assert (await post_tx(http, server.url, nxt))[0] == 200
        assert await pos_map(http, server.url) == {DB: pos_json(history.pos)}
