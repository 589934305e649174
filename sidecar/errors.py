"""The exception tree: every error litefs-sidecar raises on purpose.

    SidecarError                       every error we raise on purpose
    ├── ConfigError(field, value)      bad configuration; exit 2 before anything starts
    │   └── ConditionalWritesIgnored   an S3 endpoint that ignores If-None-Match / If-Match (found at start)
    ├── PosMismatch(db, pos)           not contiguous with upstream; HTTP 409, code "EPOSMISMATCH"
    ├── TXIDGap(db, after, got)        a chain of LTX files skips a TXID
    ├── InvalidDatabaseName(name)      a database name that could escape its directory; HTTP 400
    ├── RestoreError                   no restore plan reaches the target; nothing was written
    ├── StorageError(key)              the object store failed; .retryable
    │   ├── NotFound(key)
    │   └── PreconditionFailed(key)    a conditional write lost: another writer got there first
    └── UpstreamError(status, code)    the backup server refused; .retryable for 5xx and connection errors

The codec has its own root, `sidecar.ltx.LTXError`, because `ltx` imports nothing from `sidecar`.
`code` and `http_status` are class attributes so errors keep their type across HTTP.
"""

from __future__ import annotations

import re
import unicodedata
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


class ConditionalWritesIgnored(ConfigError):
    """The S3 endpoint of `url` ignores the conditional-write headers in `ignored` ("If-None-Match", "If-Match"):
    it overwrote an object a conditional PUT should have left alone. Leases and write-once data files rest on
    them (engine/lease.py), so such a store is refused at start, before anything of ours is written to it."""

    code = "ECONDITIONAL"

    def __init__(self, url: str, endpoint: str, ignored: list[str]) -> None:
        self.url, self.endpoint, self.ignored = url, endpoint, ignored
        super().__init__([
            f"storage {url} (S3 endpoint {endpoint}): the endpoint ignores {' and '.join(ignored)} on PUT (a "
            "conditional PUT that had to fail overwrote the object), so leases and write-once files cannot be "
            "enforced and two writers could overwrite each other; use an endpoint that supports conditional "
            "writes (AWS S3, a recent MinIO, Cloudflare R2, Tigris)"])


class PosMismatch(SidecarError):
    """An LTX file does not apply on top of the current position of `db`."""

    code = "EPOSMISMATCH"
    http_status = 409

    def __init__(self, db: str, pos: Pos, message: str = "position mismatch") -> None:
        self.db = db
        self.pos = pos
        # A message that crossed HTTP may already be this error's text (`db: why (current position …)`): say it once.
        why = _AT_POSITION.sub("", message.removeprefix(f"{db}: "))
        self.reason = why  # without the database and position, which travel beside it
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
        self.why = why
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


class PreconditionFailed(StorageError):
    """A conditional write (`if_none_match`/`if_match`) found the object not as expected; nothing was written."""

    code = "EPRECONDITION"
    http_status = 409

    def __init__(self, key: str, message: str = "precondition failed: the object was written by another writer"
                 ) -> None:
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
    """Return `name` if it is a safe cluster or database name, else raise InvalidDatabaseName.

    Safe: 1..255 bytes of UTF-8 in Unicode normal form C; printable (no control, format, private-use, surrogate or
    unassigned characters, no line or paragraph separators, so no look-alikes such as U+202E or a zero-width
    space); no leading or trailing space; no path separator; not starting with a dot (the store's own objects
    do).
    """
    if not name:
        raise InvalidDatabaseName(name, "empty")
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        raise InvalidDatabaseName(name, "longer than 255 bytes")
    if "/" in name or "\\" in name:
        raise InvalidDatabaseName(name, "contains a path separator")
    if name.startswith("."):
        raise InvalidDatabaseName(name, "starts with a dot")
    if name != name.strip():
        raise InvalidDatabaseName(name, "has leading or trailing white space")
    for c in name:
        category = unicodedata.category(c)
        if category in ("Cc", "Cf", "Co", "Cs", "Cn", "Zl", "Zp") or (category == "Zs" and c != " "):
            raise InvalidDatabaseName(name, f"contains the unprintable character U+{ord(c):04X} "
                                            f"({unicodedata.name(c, 'unnamed')})")
    if unicodedata.normalize("NFC", name) != name:
        raise InvalidDatabaseName(name, "is not in Unicode normal form C")
    return name


def validate_cluster_name(name: str) -> str:
    """A database name's rules, and no white space at all: a tokens file line is `<cluster> <token> [read]`."""
    validate_db_name(name)
    if any(c.isspace() for c in name):
        raise InvalidDatabaseName(name, "a cluster name contains white space, which no tokens file line can name")
    return name
