"""A realistic, seeded SQLite write load on an emulated LiteFS node, for tests, benchmarks and the demo."""

from __future__ import annotations

import asyncio
import random
import sqlite3
from collections.abc import Callable

from sidecar.emulator.node import EmulatedNode, EmulatorError, Tx

_SCHEMA = ("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, ts INTEGER NOT NULL, kind TEXT NOT NULL, "
           "body BLOB)")
_KINDS = ("view", "click", "signup", "purchase", "error")


class LoadWriter:
    """A realistic, seeded write load on one database; every transaction goes through `node.write`.

        async with LoadWriter(node, "app.db", rate=200, max_commits=100) as load:
            await load.wait_txs(50)
        load.history[txid]          # (timestamp ms, post-apply checksum) of every TXID it made

    Each step is one transaction: mostly single-row INSERTs, UPDATEs and DELETEs, some multi-row
    transactions, now and then a blob big enough for overflow pages; every `shrink_every` steps a DELETE
    of all but the newest rows, then VACUUM as its own transaction, so the database's commit shrinks.
    """

    def __init__(self, node: EmulatedNode, name: str, *, rate: float = 50.0, seed: int = 0,
                 shrink_every: int = 40, max_commits: int | None = None) -> None:
        self.node = node
        self.name = name
        self.rate = rate  # transactions per second; ≤ 0 means as fast as possible
        self.shrink_every = shrink_every
        self.max_commits = max_commits
        self.txs: list[Tx] = []
        self.steps = 0
        self._rng = random.Random(seed)
        self._stop = asyncio.Event()
        self._progress = asyncio.Condition()
        self._done = False
        self._task: asyncio.Task[None] | None = None

    @property
    def history(self) -> dict[int, tuple[int, int]]:
        """TXID → (timestamp ms, post-apply checksum), for checking point-in-time restores."""
        return {c.txid: (c.timestamp, c.post_apply_checksum) for c in self.txs}

    def _write(self, fn: Callable[[sqlite3.Connection], object], *, transaction: bool = True) -> None:
        commit = self.node.write(self.name, fn, transaction=transaction)
        if commit is not None:
            self.txs.append(commit)

    def step(self) -> None:
        """Run one step of the load (one transaction, or two for a shrink); synchronous."""
        rng, k = self._rng, self.steps
        self.steps += 1
        ts = 1_700_000_000_000 + k * 37

        def body() -> bytes:
            return rng.randbytes(rng.randint(2000, 12000) if rng.random() < 0.05 else rng.randint(20, 400))

        def insert(con: sqlite3.Connection, n: int) -> None:
            con.executemany("INSERT INTO events (ts, kind, body) VALUES (?, ?, ?)",
                            [(ts + i, rng.choice(_KINDS), body()) for i in range(n)])

        def top(con: sqlite3.Connection) -> int:
            return int(con.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0])

        def create(con: sqlite3.Connection) -> None:
            con.execute(_SCHEMA)
            con.execute("CREATE INDEX IF NOT EXISTS events_kind ON events (kind, ts)")
            insert(con, 20)

        if k == 0:
            self._write(create)
            return
        if self.shrink_every and k % self.shrink_every == 0:
            self._write(lambda con: con.execute(
                "DELETE FROM events WHERE id NOT IN (SELECT id FROM events ORDER BY id DESC LIMIT 20)"))
            self._write(lambda con: con.execute("VACUUM"), transaction=False)
            return
        r = rng.random()
        if r < 0.55:
            self._write(lambda con: insert(con, 1))
        elif r < 0.75:
            self._write(lambda con: con.execute(
                "UPDATE events SET body = ?, ts = ? WHERE id = ?", (body(), ts, rng.randint(1, max(1, top(con))))))
        elif r < 0.85:
            self._write(lambda con: con.execute(
                "DELETE FROM events WHERE id IN (SELECT id FROM events ORDER BY random() LIMIT ?)",
                (rng.randint(1, 5),)))
        else:
            self._write(lambda con: insert(con, rng.randint(5, 60)))

    def _finished(self) -> bool:
        return self._stop.is_set() or (self.max_commits is not None and len(self.txs) >= self.max_commits)

    async def run(self) -> None:
        """Step at `rate` until `stop()` or `max_commits`; each step runs in a worker thread."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not self._finished():
                await asyncio.to_thread(self.step)
                async with self._progress:
                    self._progress.notify_all()
                if self.rate > 0:
                    next_at = max(next_at + 1 / self.rate, loop.time() - 1)  # catch up at most 1 s
                    try:
                        async with asyncio.timeout(max(0.0, next_at - loop.time())):
                            await self._stop.wait()
                    except TimeoutError:
                        pass
        finally:
            self._done = True
            async with self._progress:
                self._progress.notify_all()

    def stop(self) -> None:
        """Ask `run()` to return after the step in progress."""
        self._stop.set()

    async def wait_txs(self, n: int) -> None:
        """Wait until at least `n` commits are recorded; raises EmulatorError if the load ends first."""
        async with self._progress:
            await self._progress.wait_for(lambda: len(self.txs) >= n or self._done)
        if len(self.txs) < n:
            raise EmulatorError(f"load on {self.name} ended after {len(self.txs)} commits, wanted {n}")

    async def __aenter__(self) -> LoadWriter:
        self._task = asyncio.create_task(self.run(), name=f"load {self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        if self._task is not None:
            await self._task  # the load's own errors propagate


__all__ = ["LoadWriter"]
