"""The object-store cost model of one database under the backup engine: the formulas, and the tables of
docs/cost-model.md, which `python -m tests.deploy.cost_model` prints and tests/deploy/test_cost_model.py checks
both against that document and against requests counted from the real engine on an S3 server.

The engine (sidecar/engine/engine.py), in steady state, for a database that receives an upload at least every
`w` seconds:

- each level makes one file per interval that saw new data: `T / max(interval, w)` PUTs per level (L0 at
  `l0_interval`, L1, L2 and the snapshot level at theirs);
- each file is downloaded exactly once, by the compaction above it (L0 by L1, L1 by L2, L2 and the previous
  snapshot by the next snapshot): GETs = PUTs;
- nothing is listed (the index lives in the state directory);
- retention deletes each L0 file on its own when it ages out, and once per snapshot interval one batch of old
  L1, L2 and snapshot files; at most one DeleteObjects request per engine tick (1 s);
- each file written also replaces the database's head object, `head.json` (a small JSON naming the latest
  state's files), which readers following the latest state poll instead of listing: one more PUT per file.
  Retention only deletes files older than the latest state's, so it leaves the head object as it was.

A database that receives no upload makes no request at all.

Per cluster, beside its databases: while any of them is busy, the engine renews the cluster's lease (one PUT)
every third of the lease TTL (sidecar/engine/lease.py); an idle cluster's lease is let go, and costs nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.engine import Levels
from sidecar.engine.lease import TTL

MONTH = 30 * 86400.0
TICK = 1.0  # Engine.run's period: one tick per second


@dataclass(frozen=True, slots=True)
class Requests:
    """Object-store requests by kind."""

    put: float = 0.0
    get: float = 0.0
    list: float = 0.0
    delete: float = 0.0

    def __add__(self, other: Requests) -> Requests:
        return Requests(self.put + other.put, self.get + other.get, self.list + other.list,
                        self.delete + other.delete)


def files(levels: Levels, seconds: float, upload_every: float | None) -> dict[int, float]:
    """Files written per level over `seconds` of steady activity (one upload every `upload_every` s; None: idle)."""
    if upload_every is None:
        return {level: 0.0 for level in levels.all}
    return {level: seconds / max(levels.interval(level), upload_every) for level in levels.all}


def lease_requests(seconds: float, active: bool, ttl: float = TTL) -> Requests:
    """Requests of one cluster's lease over `seconds`: a renewal every third of the TTL while it is busy."""
    return Requests(put=seconds / (ttl / 3)) if active else Requests()


def requests(levels: Levels, seconds: float, upload_every: float | None, tick: float = TICK) -> Requests:
    """Requests the engine makes for one database over `seconds` in steady state."""
    made = files(levels, seconds, upload_every)
    if upload_every is None:
        return Requests()
    put = sum(made.values())
    batches = made[max(levels.all)]  # one retention batch per snapshot
    delete = min(seconds / tick, made[0] + batches)
    return Requests(put=2 * put, get=put, list=0.0, delete=delete)  # each file, then head.json


@dataclass(frozen=True, slots=True)
class Workload:
    """What a database's writes look like to the bytes model.

    Each file of an interval holds the pages written in it: `new_pages_per_second × interval` data pages (rows
    appended or changed) plus `hot_pages` rewritten by every transaction (page 1 and the B-tree's root and
    interior pages). A snapshot holds the whole database. `compression` is LZ4's output/input ratio.
    """

    page_size: int = 4096
    new_pages_per_second: float = 0.05  # 200 B/s of new rows: ~0.5 GB a month
    hot_pages: int = 3
    db_bytes: int = 1 << 30
    compression: float = 1.0  # incompressible data: the upper bound

    def file_bytes(self, interval: float) -> float:
        pages = self.new_pages_per_second * interval + self.hot_pages
        return min(pages * self.page_size, self.db_bytes) * self.compression


def put_bytes(levels: Levels, seconds: float, upload_every: float | None, work: Workload) -> float:
    """Bytes uploaded over `seconds`; also the bytes downloaded (each file is read once)."""
    made = files(levels, seconds, upload_every)
    snap = max(levels.all)
    total = 0.0
    for level, n in made.items():
        if level == snap:
            total += n * work.db_bytes * work.compression
        elif n:
            total += n * work.file_bytes(seconds / n)
    return total


def stored_bytes(levels: Levels, upload_every: float, work: Workload) -> float:
    """Bytes kept in the store in steady state: each level's files for its retention period."""
    total = 0.0
    for level in levels.all:
        every = max(levels.interval(level), upload_every)
        kept = levels.retention(level) / every
        size = work.db_bytes * work.compression if level == max(levels.all) else work.file_bytes(every)
        total += kept * size
    return total


# --- prices (assumptions: list prices of the providers' standard classes, to be checked before relying on them) ---


@dataclass(frozen=True, slots=True)
class Prices:
    name: str
    put_per_1000: float  # PUT, COPY, POST, LIST ("class A")
    get_per_1000: float  # GET and the rest ("class B")
    delete_per_1000: float
    gb_month: float
    egress_per_gb: float  # downloads leaving the provider (the engine's compaction GETs, when it runs elsewhere)

    def requests(self, r: Requests) -> float:
        return ((r.put + r.list) * self.put_per_1000 + r.get * self.get_per_1000
                + r.delete * self.delete_per_1000) / 1000


AWS_S3 = Prices("AWS S3 Standard (us-east-1)", 0.005, 0.0004, 0.0, 0.023, 0.09)
TIGRIS = Prices("Tigris Standard", 0.005, 0.0005, 0.0, 0.02, 0.0)

ACTIVITY = {"busy (an upload every second)": 1.0, "light (an upload a minute)": 60.0, "idle": None}
L0_INTERVALS = (1.0, 10.0, 60.0)
GB = 1e9


def levels_with_l0(l0: float) -> Levels:
    return Levels(l0_interval=l0)


def _count(n: float) -> str:
    return f"{n:,.0f}"


def _money(x: float) -> str:
    return f"${x:,.2f}"


def request_table() -> str:
    """Requests and their price per database per month, for each L0 interval and activity (default levels)."""
    rows = ["| L0 interval | activity | PUT | GET | LIST | DELETE | requests on S3 | requests on Tigris |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for l0 in L0_INTERVALS:
        for name, every in ACTIVITY.items():
            r = requests(levels_with_l0(l0), MONTH, every)
            rows.append(f"| {l0:g} s | {name} | {_count(r.put)} | {_count(r.get)} | {_count(r.list)} | "
                        f"{_count(r.delete)} | {_money(AWS_S3.requests(r))} | {_money(TIGRIS.requests(r))} |")
    return "\n".join(rows)


def bytes_table(work: Workload = Workload()) -> str:
    """Bytes per database per month for the example workload (busy), and what storing and moving them costs."""
    rows = ["| L0 interval | uploaded (= downloaded) | stored | S3 storage | S3 egress, engine outside AWS | "
            "Tigris storage |",
            "|---|---:|---:|---:|---:|---:|"]
    for l0 in L0_INTERVALS:
        lv = levels_with_l0(l0)
        moved = put_bytes(lv, MONTH, 1.0, work)
        kept = stored_bytes(lv, 1.0, work)
        rows.append(f"| {l0:g} s | {moved / GB:,.1f} GB | {kept / GB:,.1f} GB | "
                    f"{_money(kept / GB * AWS_S3.gb_month)} | {_money(moved / GB * AWS_S3.egress_per_gb)} | "
                    f"{_money(kept / GB * TIGRIS.gb_month)} |")
    return "\n".join(rows)


def lease_table() -> str:
    """The lease's requests and price per cluster per month."""
    rows = ["| cluster | PUT | requests on S3 | requests on Tigris |", "|---|---:|---:|---:|"]
    for name, active in (("busy (any database uploading)", True), ("idle", False)):
        r = lease_requests(MONTH, active)
        rows.append(f"| {name} | {_count(r.put)} | {_money(AWS_S3.requests(r))} | {_money(TIGRIS.requests(r))} |")
    return "\n".join(rows)


def main() -> None:
    print(request_table())
    print()
    print(lease_table())
    print()
    print(bytes_table())


if __name__ == "__main__":
    main()
