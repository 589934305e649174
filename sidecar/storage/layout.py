"""Where each object lives in a store: the Litestream 0.5 layout of LTX files, plus our own small objects.

One `Layout` per store kind, so nothing else passes a "file" or "s3" string around (docs/format.md §5):

    <db prefix>/ltx/<level>/<min>-<max>.ltx     a local directory (level in decimal)
    <db prefix>/<level %04x>/<min>-<max>.ltx    S3 and every other object store
    <db prefix>/head.json                       the latest state and its restore plan (followers read it)
    <db prefix>/lease.json                      who may write this database now (engine/lease.py)
    .litefs-sidecar/identity.json               the store's identity (engine/identity.py)
    .litefs-sidecar/probe/<random>              a scratch object of the start-up check of an S3 endpoint's
                                                conditional writes (storage/s3.py), deleted at once
    .litefs-sidecar/quarantine/<key>.<ms>       an LTX file set aside at <ms> (engine/flush.py), kept for a person
                                                as long as the snapshot retention, or until its database is deleted

A database prefix is `<cluster>/<db>`. Litestream reads only the level directories, so the other objects are
invisible to it. Names never starting with `.` hold data; temporary files do.
"""

from __future__ import annotations

from dataclasses import dataclass

from sidecar.ltx import format_filename, parse_filename

# Level numbers: 0..8 consecutive, snapshots always at 9 (docs/format.md §5).
SNAPSHOT_LEVEL = 9
IDENTITY_KEY = ".litefs-sidecar/identity.json"
PROBE_PREFIX = ".litefs-sidecar/probe/"  # never a database's prefix: no cluster name starts with a dot
# Files set aside (engine/flush.py: an L0 file of another history in the way of an upload): `<prefix><key>.<ms>`,
# a name no reader takes for an LTX file.
QUARANTINE_PREFIX = ".litefs-sidecar/quarantine/"
HEAD_NAME = "head.json"
LEASE_NAME = "lease.json"


@dataclass(frozen=True, slots=True)
class SetAside:
    """What a set-aside copy's key says: the database it was taken from and when (epoch ms)."""

    key: str  # the copy's own key, under QUARANTINE_PREFIX
    prefix: str  # the database's: `<cluster>/<db>`
    ms: int


def set_aside_key(key: str, ms: int) -> str:
    """The key of the copy of the stored object at `key` set aside at `ms` (epoch ms)."""
    return f"{QUARANTINE_PREFIX}{key}.{ms}"


def set_aside_prefix(db_prefix: str) -> str:
    """The prefix of every copy set aside from the database at `db_prefix`, and of no other's: it ends with "/",
    so database `a` holds none of `ab`'s."""
    return f"{QUARANTINE_PREFIX}{db_prefix}/"


def parse_set_aside(key: str) -> SetAside | None:
    """What the key of a set-aside copy says, or None if `key` is not one (`<prefix><cluster>/<db>/…/<name>.<ms>`)."""
    if not key.startswith(QUARANTINE_PREFIX):
        return None
    original, dot, ms = key[len(QUARANTINE_PREFIX):].rpartition(".")
    parts = original.split("/")
    if not dot or not ms.isdigit() or len(parts) < 3 or not all(parts[:2]):
        return None
    return SetAside(key, "/".join(parts[:2]), int(ms))


@dataclass(frozen=True, slots=True)
class LTXKey:
    """What an LTX object's key says: its database prefix, level and TXID range."""

    prefix: str
    level: int
    min_txid: int
    max_txid: int


@dataclass(frozen=True, slots=True)
class Layout:
    """The key of every object, for one kind of store. `hex_levels`: S3's `%04x` level directories."""

    name: str
    hex_levels: bool

    def level_dir(self, level: int) -> str:
        """The directory of one level inside a database's prefix, exactly as Litestream 0.5.17 lays it out."""
        if not 0 <= level <= SNAPSHOT_LEVEL:
            raise ValueError(f"invalid level {level}: want 0..{SNAPSHOT_LEVEL}")
        return f"{level:04x}" if self.hex_levels else f"ltx/{level}"

    def ltx_key(self, prefix: str, level: int, min_txid: int, max_txid: int) -> str:
        """Key of an LTX file of `level` covering [min_txid, max_txid] under `prefix` (may be "")."""
        return _join(prefix, self.level_dir(level), format_filename(min_txid, max_txid))

    def parse(self, key: str) -> LTXKey | None:
        """What an LTX file's key says, or None if the key is not an LTX file of a level."""
        parts = key.split("/")
        if len(parts) < 2:
            return None
        txids = parse_filename(parts[-1])
        if txids is None:
            return None
        if self.hex_levels:
            lvl = parts[-2]
            if len(lvl) != 4 or any(c not in "0123456789abcdef" for c in lvl):
                return None
            level, prefix = int(lvl, 16), parts[:-2]
        else:
            if len(parts) < 3 or parts[-3] != "ltx" or not parts[-2].isdigit():
                return None
            level, prefix = int(parts[-2]), parts[:-3]
        if level > SNAPSHOT_LEVEL:
            return None
        return LTXKey("/".join(prefix), level, txids[0], txids[1])

    def head_key(self, prefix: str) -> str:
        return _join(prefix, HEAD_NAME)

    def lease_key(self, prefix: str) -> str:
        return _join(prefix, LEASE_NAME)


def _join(*parts: str) -> str:
    return "/".join(p for p in (x.strip("/") for x in parts) if p)


FILE_LAYOUT = Layout("file", hex_levels=False)
S3_LAYOUT = Layout("s3", hex_levels=True)

__all__ = ["FILE_LAYOUT", "IDENTITY_KEY", "PROBE_PREFIX", "QUARANTINE_PREFIX", "S3_LAYOUT", "SNAPSHOT_LEVEL", "LTXKey",
           "Layout", "SetAside", "parse_set_aside", "set_aside_key", "set_aside_prefix"]
