"""A corrupt or foreign file in ltx/ is reported once with its path, never shipped, and stops nothing else."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from sidecar.ltx import Pos
from tests.daemon.conftest import Env, environment, eventually, write


def bad_files_reported(env: Env) -> float:
    assert env.sidecar is not None
    return env.sidecar.metrics.errors.labels("bad_file")._value.get()  # type: ignore[no-any-return]


async def test_corrupt_and_foreign_files_are_skipped(env: Env, tmp_path: Path) -> None:
    write(env, "broken.db", 12)
    write(env, "fine.db", 12)
    victim = env.node.ltx_files("broken.db")[6]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(data)
    foreign = env.node.ltx_dir("fine.db") / "00000000000000ff-00000000000000ff.ltx"
    foreign.write_text("not an LTX file\n")
    sidecar = await env.start()
    await env.synced("broken.db")
    await env.synced("fine.db")
    assert {victim, foreign} <= sidecar.dbs["broken.db"].local.bad | sidecar.dbs["fine.db"].local.bad
    for db in ("broken.db", "fine.db"):
        got = await env.restore(db, tmp_path / db)
        assert Pos(got.txid, got.checksum) == env.node.pos(db)  # the good history, nothing from the bad files
    write(env, "broken.db", 3, start=12)  # both keep shipping afterwards
    write(env, "fine.db", 3, start=12)
    await env.synced("broken.db")
    await env.synced("fine.db")
    await asyncio.sleep(0.3)  # a few more ticks: the same files are not reported again
    assert bad_files_reported(env) == 2
    assert foreign.exists()  # skipped, not touched: it is not ours to delete
    assert sidecar.dbs["fine.db"].remote == env.node.pos("fine.db")


async def test_a_file_deleted_by_someone_else_before_shipping_is_reported(env: Env) -> None:
    write(env, "app.db", 1)
    sidecar = await env.start(batch_interval=3600.0)
    await env.synced("app.db")  # the first tick has run; the next is an hour away
    write(env, "app.db", 5, start=1)
    victim = env.node.ltx_files("app.db")[-2]
    await eventually(lambda: "app.db" in sidecar.dbs and
                     victim in [f.path for f in sidecar.dbs["app.db"].local.sorted()])
    victim.unlink()  # what LiteFS's retention monitor would do with data.retention on
    await eventually(lambda: sidecar.metrics.errors.labels("deleted_unshipped")._value.get() == 1)


async def test_a_broken_header_at_upstreams_position_is_skipped_and_shipping_goes_on(env: Env) -> None:
    write(env, "app.db", 5)
    await env.start()
    await env.synced("app.db")
    await env.stop()
    shipped = env.node.ltx_files("app.db")[-1]  # the file upstream's position points at, kept as the newest
    data = bytearray(shipped.read_bytes())
    data[0] ^= 0xFF  # its magic: the header no longer reads
    shipped.write_bytes(data)
    write(env, "app.db", 5, start=5)
    sidecar = await env.start()  # a fresh start: no header is remembered
    await env.synced("app.db")
    assert shipped in sidecar.dbs["app.db"].local.bad
    await eventually(lambda: bad_files_reported(env) == 1)


async def test_an_upload_the_engine_refuses_is_a_visible_error_retried_with_backoff(tmp_path: Path) -> None:
    """A node whose clock runs more than `engine.max_clock_skew` ahead: the in-process engine refuses its uploads at
    the door. That is the database's error in `/healthz`, retried with backoff (as `serve`'s 422 would be), not a
    stall reported as a bad local file on every tick while the health looks fine."""
    async with environment(tmp_path, clock=lambda: time.time() + 7200) as env:
        write(env, "app.db", 3)
        sidecar = await env.start()
        await env.synced("app.db")  # the first upload: the node's state exported, stamped by the sidecar's clock
        write(env, "app.db", 3, start=3)  # these carry the node's own timestamps
        await eventually(lambda: "past this server's clock" in (sidecar.health()["databases"]["app.db"]["error"]
                                                                or ""))
        assert "app.db" in sidecar.health()["databases"]["app.db"]["error"]
        assert sidecar.backoff["app.db"].failures > 0 and not sidecar.dbs["app.db"].local.bad
