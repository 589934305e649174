"""`litefs-sidecar demo`: an emulated LiteFS node under a real SQLite write load, the sidecar, the engine, and a
point-in-time restore at the end, verified by checksum and `PRAGMA integrity_check`. Embedded defaults only."""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.commands import args as argtypes

if TYPE_CHECKING:  # imported when the demo runs: `litefs-sidecar --help` stays quick
    from sidecar.daemon import Sidecar
    from sidecar.daemon.upstream import EngineUpstream
    from sidecar.emulator import EmulatedNode

EXAMPLES = """\
examples:
  litefs-sidecar demo                      20 s in a temporary directory
  litefs-sidecar demo --seconds 60 --dir ./demo --rate 200

What runs: an emulated LiteFS node (real SQLite transactions → LTX files in <dir>/litefs/dbs/<db>/ltx/), the sidecar
shipping them every second to an engine on file://<dir>/backups, and finally a restore of a moment in the middle.
"""


def register(sub: Any) -> None:
    p = sub.add_parser("demo", help="see it work: emulated LiteFS + sidecar + engine, then a restore",
                       description="Run an emulated LiteFS node under a SQLite write load beside the sidecar and an "
                                   "in-process engine; show shipping live; end with a verified point-in-time restore.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=argtypes.positive, default=20.0,
                   help="how long the load runs (default %(default)s)")
    p.add_argument("--rate", type=float, default=100.0, help="transactions per second per database (default 100)")
    p.add_argument("--databases", type=argtypes.positive_int, default=2,
                   help="how many databases (default %(default)s)")
    p.add_argument("--dir", type=Path, help="where to put everything (default: a temporary directory, removed)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from sidecar import log as logmod
    logmod.setup("warning", "console")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        return asyncio.run(demo(args.dir.resolve(), args.seconds, args.rate, args.databases, kept=True))
    with tempfile.TemporaryDirectory(prefix="litefs-sidecar-demo-") as tmp:
        return asyncio.run(demo(Path(tmp), args.seconds, args.rate, args.databases, kept=False))


def say(text: str) -> None:
    print(text, flush=True)


async def demo(root: Path, seconds: float, rate: float, databases: int, *, kept: bool) -> int:
    """Run it all in `root`; `kept`: `root` outlives the demo, so its backups can be looked at afterwards."""
    from sidecar.config import EngineConfig, SidecarConfig
    from sidecar.daemon import Sidecar
    from sidecar.daemon.litefs import LiteFSNode
    from sidecar.daemon.upstream import EngineUpstream
    from sidecar.emulator import EmulatedNode, start_http

    node = EmulatedNode(root / "litefs", root / "mnt")
    runner, url = await start_http(node)
    try:
        config = SidecarConfig(data_dir=node.data_dir, mount_dir=node.mount_dir, litefs_url=url,
                               upstream=f"file://{root / 'backups'}", state_dir=root / "sidecar",
                               metrics_addr="127.0.0.1:0", retention=5.0)
        upstream = await EngineUpstream.open(config.upstream, config.cluster, config.state_dir / "engine",
                                             EngineConfig(l0_interval=0.0))
        sidecar = Sidecar(config, upstream, LiteFSNode(url, node.mount_dir))
        stop = asyncio.Event()
        started = asyncio.Event()
        task = asyncio.create_task(sidecar.run(stop, started=lambda _: started.set()))
        try:
            await started.wait()
            ok = await _show(node, url, sidecar, upstream, root, seconds, rate, databases, kept)
        finally:  # also on Ctrl+C: the sidecar stops as under SIGTERM and closes its connections
            stop.set()
            await task
    finally:
        await runner.cleanup()
        node.close()
    if not ok:
        print("demo: a restore did not match", file=sys.stderr)
    return 0 if ok else 1


async def _show(node: EmulatedNode, url: str, sidecar: Sidecar, upstream: EngineUpstream, root: Path,
                seconds: float, rate: float, databases: int, kept: bool) -> bool:
    """The load, the live table, and the restores; True if every restore matched the node."""
    from sidecar.emulator import LoadWriter

    names = [f"app{i}.db" for i in range(1, databases + 1)]
    say(f"LiteFS node (emulated) {url}  data {node.data_dir}")
    say(f"sidecar → {sidecar.config.upstream}  metrics {sidecar.url}/metrics")
    say(f"writing {rate:g} tx/s to {', '.join(names)} for {seconds:g} s\n")
    say(f"{'time':>5}  {'db':<8} {'node TXID':>10} {'shipped':>10} {'HWM':>10} {'lag s':>6} {'local files':>11}")
    loads = [LoadWriter(node, name, rate=rate, seed=i) for i, name in enumerate(names)]
    marks: dict[str, tuple[int, str]] = {}  # a shipped TXID in the middle of the run, for the restore at the end
    try:
        for load in loads:
            await load.__aenter__()
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            await asyncio.sleep(1.0)
            elapsed = time.monotonic() - t0
            for name in names:
                db = sidecar.dbs.get(name)
                if db is None:
                    continue
                pos = node.pos(name)
                shipped = db.remote.txid if db.remote else 0
                lag = sidecar.metrics.lag.labels(name)._value.get()
                say(f"{elapsed:5.0f}  {name:<8} {pos.txid:>10} {shipped:>10} {db.hwm or 0:>10} {lag:6.2f} "
                    f"{db.local.count:>11}")
                if name not in marks and elapsed >= seconds / 2 and db.remote is not None:
                    marks[name] = (db.remote.txid, time.strftime("%H:%M:%S"))
    finally:
        for load in loads:
            await load.__aexit__(None, None, None)
    async with asyncio.timeout(30):
        for _ in iter(lambda: all(sidecar.dbs[n].remote == node.pos(n) for n in names), True):
            await asyncio.sleep(0.1)  # until upstream holds every database's last transaction
    say("\nall shipped. point-in-time restore of each database to the middle of the run:")
    ok = True
    engine = upstream.engine
    for name, load in zip(names, loads, strict=True):
        txid, when = marks.get(name, (node.pos(name).txid, "the end"))
        checksum = load.history[txid][1]  # what the node recorded when it committed that transaction
        out = root / f"restored-{name}"
        result = await engine.restore_to("default", name, out, txid=txid, integrity_check=True)
        con = sqlite3.connect(f"file:{out}?mode=ro", uri=True)
        try:
            integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
            rows = con.execute("SELECT count(*) FROM events").fetchone()[0]
        finally:
            con.close()
        good = result.checksum == checksum and integrity == "ok"
        ok &= good
        say(f"  {name}: TXID {txid} (shipped at {when}) → {out.name}: {rows} rows, checksum {result.checksum:016x} "
            f"{'= node' if result.checksum == checksum else '≠ node'}, integrity_check {integrity}  "
            f"{'OK' if good else 'FAILED'}")
    if kept:
        say(f"\nrestore points: litefs-sidecar ls file://{root / 'backups'}/default/{names[0]}")
    else:  # the temporary directory goes with the demo: suggest nothing that points into it
        say("\nthe demo's files are removed now; to look at its backups afterwards (litefs-sidecar ls, restore, "
            "verify), run it with --dir DIR")
    return ok


__all__ = ["register"]
