"""LTX codec throughput on 4 KiB pages: decode+verify, encode+fsync, compact+fsync, with baselines.

Run: python -m bench.ltx_bench [--pages N]
Prints MB/s of page data and pages/s for v2 (raw), v2 (LZ4 frame) and v3 (per-page LZ4), next to a plain
memory copy and raw LZ4 over the same pages, measured in the same run (medians of --repeat runs).
"""

from __future__ import annotations

import argparse
import mmap
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import lz4.block
import lz4.frame

from sidecar.ltx import FLAG_COMPRESS_LZ4, Header, Version
from sidecar.ltx.checksum import database_checksum
from sidecar.ltx.compactor import compact
from sidecar.ltx.decoder import Decoder
from sidecar.ltx.encoder import Encoder

PAGE = 4096


def make_pages(n: int) -> list[bytes]:
    """Pages like a SQLite table's: half text-ish (compressible), a tail of zeros."""
    rng = random.Random(7)
    words = [bytes(rng.choices(b"abcdefghijklmnopqrstuvwxyz0123456789 ", k=rng.randint(3, 12))) for _ in range(500)]
    pages = []
    for _ in range(n):
        body = b" ".join(rng.choices(words, k=300))[: PAGE // 2]
        pages.append(body + bytes(PAGE - len(body)))
    return pages


def write_file(path: Path, pages: list[bytes], first_pgno: int, commit: int, txid: int, pre: int, post: int,
               version: Version, flags: int) -> None:
    header = Header(page_size=PAGE, commit=commit, min_txid=txid, max_txid=txid, timestamp=txid,
                    pre_apply_checksum=pre, flags=flags)
    with open(path, "wb") as f:
        enc = Encoder(f, header, version)
        for i, page in enumerate(pages):
            enc.write_page(first_pgno + i, page)
        enc.close(post)


def drain(data: mmap.mmap, version: Version) -> None:
    """Decode every page and verify the trailer; no view outlives the call."""
    dec = Decoder(data, version)
    for _pgno, _page in dec.pages():
        pass
    dec.close()


def timed(fn: Callable[[], object], repeat: int) -> float:
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs)


def report(name: str, seconds: float, pages: int) -> None:
    mb = pages * PAGE / 1e6
    print(f"{name:<38} {mb / seconds:9.0f} MB/s {pages / seconds / 1e3:9.0f} kpages/s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pages", type=int, default=25_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--files", type=int, default=10, help="inputs to compact")
    args = ap.parse_args()
    n, repeat = args.pages, args.repeat
    pages = make_pages(n)
    tmp = Path(tempfile.mkdtemp(prefix="ltx-bench-"))
    print(f"{n} pages of {PAGE} bytes ({n * PAGE / 1e6:.0f} MB), median of {repeat} runs, files in {tmp}")

    buf = bytearray(PAGE * n)
    def memcpy() -> None:
        for i, p in enumerate(pages):
            buf[i * PAGE:(i + 1) * PAGE] = p
    report("baseline: memcpy per page", timed(memcpy, repeat), n)
    report("baseline: lz4.block compress", timed(lambda: [lz4.block.compress(p, store_size=False) for p in pages],
                                                 repeat), n)
    blocks = [lz4.block.compress(p, store_size=False) for p in pages]
    report("baseline: lz4.block decompress", timed(
        lambda: [lz4.block.decompress(b, uncompressed_size=PAGE) for b in blocks], repeat), n)
    frame = lz4.frame.compress(b"".join(pages), block_size=lz4.frame.BLOCKSIZE_MAX64KB, block_linked=False)
    report("baseline: lz4.frame decompress", timed(lambda: lz4.frame.decompress(frame), repeat), n)

    snap_ck = database_checksum(((i + 1, p) for i, p in enumerate(pages)), PAGE)
    kinds = [("v2", Version.V2, 0), ("v2-lz4", Version.V2, FLAG_COMPRESS_LZ4), ("v3", Version.V3, 0)]
    for label, version, flags in kinds:
        path = tmp / f"snap-{label}.ltx"

        def encode(path: Path = path, version: Version = version, flags: int = flags) -> None:
            write_file(path, pages, 1, n, 1, 0, snap_ck, version, flags)
            fd = os.open(path, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        report(f"encode {label} (+fsync)", timed(encode, repeat), n)

        def decode(path: Path = path, version: Version = version) -> None:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
                drain(mm, version)
        report(f"decode+verify {label} (mmap)", timed(decode, repeat), n)

        # Compaction: a snapshot plus `files` increments each rewriting a different tenth of the pages.
        per = n // args.files
        inputs = [path]
        ck = snap_ck
        for k in range(args.files):
            p = tmp / f"inc-{label}-{k}.ltx"
            chunk = pages[k * per:(k + 1) * per]
            # Pages rewritten with identical bytes keep the checksum, so the chain stays valid.
            write_file(p, chunk, k * per + 1, n, k + 2, ck, ck, version, flags)
            inputs.append(p)
        in_pages = n + per * args.files
        out = tmp / f"out-{label}.ltx"

        def run_compact(inputs: list[Path] = inputs, out: Path = out, version: Version = version) -> None:
            files = [open(p, "rb") for p in inputs]
            maps = [mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) for f in files]
            with open(out, "wb") as dst:
                compact(maps, dst, version=version)
                dst.flush()
                os.fsync(dst.fileno())
            for m in maps:
                try:
                    m.close()
                except BufferError:
                    pass
            for f in files:
                f.close()
        report(f"compact {label} {len(inputs)} files (+fsync)", timed(run_compact, repeat), in_pages)
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


if __name__ == "__main__":
    main()
