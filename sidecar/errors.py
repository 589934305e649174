"""The exception tree: every error litefs-sidecar raises on purpose.

    SidecarError                       every error we raise on purpose
    ├── ConfigError(field, value)      bad configuration; exit 2 before anything starts
    ├── PosMismatch(db, pos)           not contiguous with upstream; HTTP 409, code "EPOSMISMATCH"
    ├── TXIDGap(db, after, got)        a chain of LTX files skips a TXID
    ├── InvalidDatabaseName(name)      a database name that could escape its directory; HTTP 400
    ├── RestoreError                   no restore plan reaches the target; nothing was written
    ├── StorageError(key)              the object store failed; .retryable
    │   └── NotFound(key)
    └── UpstreamError(status, code)    the backup server refused; .retryable for 5xx and connection errors

The codec has its own root, `sidecar.ltx.LTXError`, because `ltx` imports nothing from `sidecar`.
`code` and `http_status` are class attributes so errors keep their type across HTTP.
"""

from __future__ import annotations

import re
from typing import Any

from sidecar.ltx import Pos

_AT_POSITION = re.compile(r" \(current position [0-9a-f]{16}/[0-9a-f]{16}\)$")


class SidecarError(Exception):
    """Root of every error litefs-sidecar raises on purpose."""

    code = "EINTERNAL"
    http_status = 500


class ConfigError(SidecarError):
    """One or more configuration problems; `problems` lists each as `field = value (from source): why`."""

    code = "ECONFIG"
    http_status = 400

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class PosMismatch(SidecarError):
    """An LTX file does not apply on top of the current position of `db`."""

    code = "EPOSMISMATCH"
    http_status = 409

    def __init__(self, db: str, pos: Pos, message: str = "position mismatch") -> None:
        self.db = db
        self.pos = pos
        # A message that crossed HTTP is already this error's text (`db: why (current position …)`): say it once.
        why = _AT_POSITION.sub("", message.removeprefix(f"{db}: "))
        super().__init__(f"{db}: {why} (current position {pos})")


class TXIDGap(SidecarError):
    """A chain of LTX files skips TXIDs after `after`."""

    code = "ETXIDGAP"
    http_status = 409

    def __init__(self, db: str, after: int, got: int) -> None:
        self.db, self.after, self.got = db, after, got
        super().__init__(f"{db}: TXID gap: expected {after + 1:016x}, got {got:016x}")


class InvalidDatabaseName(SidecarError):
    """A database name that is empty, too long, or could escape its directory."""

    code = "EBADDB"
    http_status = 400

    def __init__(self, name: str, why: str) -> None:
        self.name = name
        super().__init__(f"invalid database name {name!r}: {why}")


class RestoreError(SidecarError):
    """No restore is possible for the requested target; nothing was written."""

    code = "ENOTXID"
    http_status = 404


class StorageError(SidecarError):
    """The object store failed on `key`; `retryable` says whether trying again may help."""

    code = "ESTORAGE"
    http_status = 503

    def __init__(self, key: str, message: str, *, retryable: bool = False) -> None:
        self.key = key
        self.retryable = retryable
        super().__init__(f"{key}: {message}")


class NotFound(StorageError):
    """The object at `key` does not exist."""

    code = "ENOTFOUND"
    http_status = 404

    def __init__(self, key: str, message: str = "not found") -> None:
        super().__init__(key, message, retryable=False)


class UpstreamError(SidecarError):
    """The backup server refused a request or could not be reached."""

    code = "EUPSTREAM"
    http_status = 502

    def __init__(self, status: int, code: str, message: str, **extra: Any) -> None:
        self.status = status
        self.upstream_code = code
        self.extra = extra
        super().__init__(f"upstream {status} {code}: {message}")

    @property
    def retryable(self) -> bool:
        """5xx answers and connection errors (status 0) may succeed later."""
        return self.status == 0 or self.status >= 500 or self.status == 429


def validate_db_name(name: str) -> str:
    """Return `name` if it is a safe database name, else raise InvalidDatabaseName."""
    if not name:
        raise InvalidDatabaseName(name, "empty")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise InvalidDatabaseName(name, "longer than 255 bytes")
    if name in (".", ".."):
        raise InvalidDatabaseName(name, "is a directory reference")
    if "/" in name or "\\" in name:
        raise InvalidDatabaseName(name, "contains a path separator")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidDatabaseName(name, "contains a control character or NUL")
    return name
