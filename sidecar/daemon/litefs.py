"""The local LiteFS node: its mount files (`<db>-pos`, `.primary`) and the HTTP API calls the sidecar makes.

    node.is_primary()              `.primary` is absent on the primary (docs/litefs.md §6)
    node.pos(db)                   `<mount>/<db>-pos`: TXID/post-apply checksum
    await node.export(db)          (SQLite bytes, Pos before, Pos after): a consistent copy, at a TXID in between
    await node.import_db(db, b)    `POST /import`: LiteFS writes the bytes as its next transaction
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp

from sidecar.errors import SidecarError
from sidecar.ltx import Pos, parse_txid


class LiteFSError(SidecarError):
    """The local LiteFS node refused or could not be reached."""

    code = "ELITEFS"


class LiteFSNode:
    def __init__(self, url: str, mount_dir: Path, *, timeout: float = 300.0) -> None:
        self.url = url.rstrip("/")
        self.mount_dir = mount_dir
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout, sock_connect=5))

    def is_primary(self) -> bool:
        """`.primary` names the primary on replicas and is absent on the primary itself."""
        return not (self.mount_dir / ".primary").exists()

    def pos(self, db: str) -> Pos | None:
        """The position LiteFS publishes in `<mount>/<db>-pos`, or None if it cannot be read."""
        try:
            text = (self.mount_dir / f"{db}-pos").read_text().strip()
            txid, _, checksum = text.partition("/")
            return Pos(parse_txid(txid), parse_txid(checksum))
        except (OSError, ValueError):
            return None

    async def info(self) -> dict[str, Any]:
        async with self._session.get(f"{self.url}/info") as resp:
            body = await resp.read()
            if resp.status != 200:
                raise LiteFSError(f"GET {self.url}/info: {resp.status} {body[:200].decode('utf-8', 'replace')}")
            info: dict[str, Any] = json.loads(body)
            return info

    async def export(self, db: str) -> tuple[bytes, Pos, Pos]:
        """A consistent copy of `db`, with `<db>-pos` read before and after it. LiteFS does not say which TXID the
        copy is at; on a busy database the two differ, and the caller finds it between them by checksum."""
        before = self.pos(db)
        data = await self._call("GET", "/export", db)
        after = self.pos(db)
        if before is None or after is None:
            raise LiteFSError(f"export {db}: cannot read {self.mount_dir / f'{db}-pos'}")
        return data, before, after

    async def import_db(self, db: str, data: bytes) -> None:
        await self._call("POST", "/import", db, data)

    async def _call(self, method: str, path: str, db: str, data: bytes | None = None) -> bytes:
        what = f"{method} {self.url}{path}?name={db}"
        try:
            async with self._session.request(method, self.url + path, params={"name": db}, data=data) as resp:
                body = await resp.read()
                if resp.status != 200:
                    raise LiteFSError(f"{what}: {resp.status} {body[:200].decode('utf-8', 'replace').strip()}")
                return body
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise LiteFSError(f"{what}: {err or type(err).__name__}") from err

    async def close(self) -> None:
        await self._session.close()


__all__ = ["LiteFSError", "LiteFSNode"]
