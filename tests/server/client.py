"""A test client that behaves like LiteFS 0.5's built-in backup client (lfsc/backup_client.go, spec §9–10)."""

from __future__ import annotations

import io
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp

from sidecar.ltx import Pos, Version
from sidecar.ltx.compactor import compact
from sidecar.ltx.sqlite import Applier

MAX_FILES = 256


class PosMismatchError(Exception):
    def __init__(self, pos: Pos) -> None:
        self.pos = pos
        super().__init__(f"position mismatch: server at {pos}")


class BackupClient:
    """GET /pos, POST /db/tx (chunked, no length), GET /db/snapshot — with LiteFS's headers."""

    def __init__(self, session: aiohttp.ClientSession, url: str, token: str, cluster_id: str = "LFSC0123456789ABCDEF"):
        self.session, self.url = session, url
        self.headers = {"Authorization": token, "Litefs-Cluster-Id": cluster_id, "User-Agent": "Go-http-client/1.1"}
        self.instance: str | None = None
        self.hwm = 0

    def _h(self) -> dict[str, str]:
        h = dict(self.headers)
        if self.instance:
            h["fly-force-instance-id"] = self.instance
        return h

    async def _check(self, resp: aiohttp.ClientResponse) -> None:
        self.instance = resp.headers.get("Lfsc-Instance-Id") if resp.status != 503 else None
        if resp.status // 100 == 2:
            return
        body = (await resp.content.read(65536)).decode(errors="replace")
        try:
            data = json.loads(body)
        except ValueError:
            data = {}
        if data.get("code") == "EPOSMISMATCH":
            p = data["pos"]
            raise PosMismatchError(Pos(int(p["txid"], 16), int(p["postApplyChecksum"], 16)))
        raise RuntimeError(f"backup client error ({resp.status}): {data.get('error') or body}")

    async def pos_map(self) -> dict[str, Pos]:
        async with self.session.get(f"{self.url}/pos", headers=self._h()) as resp:
            await self._check(resp)
            data = await resp.json()
        return {k: Pos(int(v["txid"], 16), int(v["postApplyChecksum"], 16)) for k, v in data.items()}

    async def write_tx(self, db: str, ltx: bytes) -> int:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(ltx), 4096):
                yield ltx[i:i + 4096]
        async with self.session.post(f"{self.url}/db/tx", params={"db": db}, data=chunks(),
                                     headers=self._h()) as resp:
            await self._check(resp)
            hwm = resp.headers["Litefs-Hwm"]
        assert len(hwm) == 16, f"cannot parse high-water mark {hwm!r}"
        self.hwm = int(hwm, 16)
        return self.hwm

    async def fetch_snapshot(self, db: str) -> bytes:
        async with self.session.get(f"{self.url}/db/snapshot", params={"db": db}, headers=self._h()) as resp:
            await self._check(resp)
            return await resp.read()


class Node:
    """A LiteFS primary's view of one database: its LTX chain and database file, and its backup loop."""

    def __init__(self, path: Path, files: list[bytes]) -> None:
        self.path = path
        self.files = list(files)  # what the node holds locally, one per TXID here
        self.pos = Pos()
        with open(path, "w+b") as f:
            applier = Applier(f)
            for data in self.files:
                applier.apply(data, Version.V2)
            self.pos = applier.pos

    def local_from(self, txid: int) -> list[bytes]:
        from sidecar.ltx.decoder import Decoder
        return [d for d in self.files if Decoder(d, Version.V2).header.min_txid >= txid]

    async def sync(self, client: BackupClient, db: str, remote: Pos) -> Pos:
        """`streamBackupDB`: upload a snapshot, the next files, or restore from the backup on mismatch."""
        try:
            if remote.is_zero:
                with open(self.path, "rb") as f:
                    from sidecar.ltx.sqlite import encode_db
                    out = io.BytesIO()
                    encode_db(f, out, txid=self.pos.txid, compress=True, timestamp=int(time.time() * 1000))
                await client.write_tx(db, out.getvalue())
                return self.pos
            if remote.txid > self.pos.txid or (remote.txid == self.pos.txid and remote != self.pos):
                raise PosMismatchError(remote)
            if remote == self.pos:
                return remote
            batch = self.local_from(remote.txid + 1)[:MAX_FILES]
            out = io.BytesIO()
            h, t = compact(batch, out, version=Version.V2)
            await client.write_tx(db, out.getvalue())
            return Pos(h.max_txid, t.post_apply_checksum)
        except PosMismatchError:
            return await self.restore(client, db)

    async def restore(self, client: BackupClient, db: str) -> Pos:
        """`restoreDBFromBackup`: the backup wins; local transactions it lacks are discarded."""
        snap = await client.fetch_snapshot(db)
        with open(self.path, "w+b") as f:
            self.pos = Applier(f).apply(snap, Version.V2)
        self.files = [snap]
        return self.pos
