"""A busy database is followed by name (the watcher set aside), and watched again once it goes quiet."""

from __future__ import annotations

import asyncio
from pathlib import Path

from sidecar.emulator import EmulatedNode
from tests.daemon.conftest import Env, eventually, write


async def busy(env: Env, db: str, seconds: float, start: int = 0, until: asyncio.Event | None = None) -> int:
    """Write a transaction every ~20 ms for `seconds` (or `until` is set), yielding to the sidecar between;
    returns the next row."""
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    i = start
    while loop.time() < end and not (until is not None and until.is_set()):
        write(env, db, 1, start=i)
        i += 1
        await asyncio.sleep(0.02)
    return i


async def test_followed_while_busy_watched_again_when_quiet(env: Env, tmp_path: Path) -> None:
    sidecar = await env.start(rescan_interval=3600.0)  # the periodic rescan plays no part here
    write(env, "app.db", 1)
    await eventually(lambda: "app.db" in sidecar._watched)
    quiet = asyncio.Event()
    writer = asyncio.create_task(busy(env, "app.db", 60.0, start=1, until=quiet))
    # Followed by name, and the watch rebuilt without it (no inotify events for it while followed). Both at
    # once, while the writer keeps it busy: the watcher rebuilds a moment after following starts, and on a
    # busy machine a tick that finds nothing new ends following; so wait for the pair, not one then the other.
    await eventually(lambda: "app.db" in sidecar._following and "app.db" not in sidecar._watched, within=30.0)
    quiet.set()
    row = await writer
    await eventually(lambda: "app.db" not in sidecar._following and "app.db" in sidecar._watched, within=10.0)
    await env.synced("app.db")
    # Watched again: a lone transaction is still shipped, and the whole history restores exactly.
    write(env, "app.db", 1, start=row)
    await env.synced("app.db")
    result = await env.restore("app.db", tmp_path / "out.db")
    assert result.checksum == env.node.pos("app.db").post_apply_checksum
    txids = [s.max_txid for name, s in sidecar.shipped if name == "app.db"]
    assert txids == sorted(txids) and txids[-1] == env.node.pos("app.db").txid


async def test_a_snapshot_replacing_every_file_while_followed_is_found(env: Env, tmp_path: Path) -> None:
    """LiteFS deletes every other file when it takes a snapshot: the first quiet tick sees the head gone."""
    sidecar = await env.start(rescan_interval=3600.0)
    write(env, "app.db", 1)
    writer = asyncio.create_task(busy(env, "app.db", 10.0, start=1))
    await eventually(lambda: "app.db" in sidecar._following, within=10.0)
    other = EmulatedNode(tmp_path / "other-data", tmp_path / "other-mount", node_id=99)
    try:
        other.execute("app.db", "CREATE TABLE s (x)")
        for i in range(5):
            other.execute("app.db", "INSERT INTO s VALUES (?)", (i,))
        snapshot = other.snapshot("app.db")
    finally:
        other.close()
    writer.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    env.node.apply_ltx("app.db", snapshot)  # as a restore from backup does: one file, 1-N, nothing else
    local = sidecar.dbs["app.db"].local
    # The first quiet tick finds its head file gone and rescans; the sidecar then sees a node behind upstream
    # and brings it to upstream's state (an import, the node's next TXID), as after any restore.
    await eventually(lambda: "app.db" not in sidecar._following and local.head is not None and
                     local.head.max_txid == env.node.pos("app.db").txid, within=5.0)
    await env.synced("app.db")
    assert [f.path for f in local.sorted()] == env.node.ltx_files("app.db")
    result = await env.restore("app.db", tmp_path / "out.db")
    assert result.checksum == env.node.pos("app.db").post_apply_checksum
