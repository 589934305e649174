"""Which store a state directory belongs to, and whether its cache can be trusted.

The store holds one identity object, written once with `If-None-Match: *` by the first engine that finds none
(docs/format.md §5):

    .litefs-sidecar/identity.json      {"id": "<random>", "format": 1, "created": "<RFC 3339>"}

The state directory records the identity of the store its cache describes (`<state>/store.json`). At open, a
state directory of another store (the bucket was moved, emptied or restored, or the state directory reused) has
its cache and upload log set aside (`<state>/.discarded-<old id>/`), and everything is rebuilt from the store;
the uploads in that log were meant for the other store, and the clients send them again when they find this
store's position. Either way the indexes are then reconciled with one listing of the store (catalog.py).
"""

from __future__ import annotations

import json
import secrets
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import structlog

from sidecar.errors import NotFound, PreconditionFailed, StorageError
from sidecar.fsutil import write_atomically
from sidecar.storage.base import Storage
from sidecar.storage.layout import IDENTITY_KEY

log = structlog.get_logger("sidecar.engine")

FORMAT = 1
STORE_FILE = "store.json"
OWNER_FILE = "owner"


@dataclass(frozen=True, slots=True)
class Identity:
    id: str
    format: int


async def store_identity(storage: Storage) -> Identity:
    """The store's identity, created (once, whoever is first) if it has none."""
    for _ in range(3):
        try:
            doc = json.loads(await storage.get_bytes(IDENTITY_KEY))
            return Identity(str(doc["id"]), int(doc["format"]))
        except NotFound:
            pass
        except (ValueError, KeyError, TypeError) as err:
            raise StorageError(IDENTITY_KEY, f"unreadable store identity ({err}); it is not ours to repair") from err
        doc = {"id": secrets.token_hex(16), "format": FORMAT, "created": datetime.now(UTC).isoformat()}
        try:
            await storage.put_bytes(IDENTITY_KEY, json.dumps(doc).encode(), if_none_match=True)
            log.info("store identity created", store=storage.url, id=doc["id"])
            return Identity(str(doc["id"]), FORMAT)
        except PreconditionFailed:
            continue  # another engine created it first: read theirs
    raise StorageError(IDENTITY_KEY, "store identity keeps changing")


class StateBinding:
    """The state directory's record of its store."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir

    def owner(self) -> str:
        """This state directory's own id: the owner its engine writes into leases, the same across restarts."""
        path = self.state_dir / OWNER_FILE
        try:
            value = path.read_text().strip()
            if value:
                return value
        except FileNotFoundError:
            pass
        value = secrets.token_hex(8)
        write_atomically(path, value)
        return value

    def recorded(self) -> str | None:
        try:
            return str(json.loads((self.state_dir / STORE_FILE).read_text())["id"])
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return None

    def bind(self, identity: Identity, url: str) -> None:
        write_atomically(self.state_dir / STORE_FILE, json.dumps({"id": identity.id, "url": url}))

    def set_aside(self, old: str | None) -> Path:
        """Move the cache and upload log of another store out of the way; returns where they went."""
        dest = self.state_dir / f".discarded-{old or 'unknown'}"
        shutil.rmtree(dest, ignore_errors=True)
        dest.mkdir(parents=True)
        for entry in self.state_dir.iterdir():
            if entry.name.startswith(".") or entry.name in (STORE_FILE, OWNER_FILE):
                continue
            entry.rename(dest / entry.name)
        return dest


__all__ = ["Identity", "StateBinding", "store_identity"]
