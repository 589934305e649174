"""LTX file names: `%016x-%016x.ltx` of (min TXID, max TXID) (docs/format.md §6.3)."""

from __future__ import annotations

import re

_NAME = re.compile(r"^([0-9a-f]{16})-([0-9a-f]{16})\.ltx$")


def format_filename(min_txid: int, max_txid: int) -> str:
    """Name an LTX file; lexical order equals TXID order because the width is fixed."""
    return f"{min_txid:016x}-{max_txid:016x}.ltx"


def parse_filename(name: str) -> tuple[int, int] | None:
    """Return (min TXID, max TXID), or None if `name` is not an LTX file name (temp files are not)."""
    m = _NAME.match(name)
    if m is None:
        return None
    return int(m.group(1), 16), int(m.group(2), 16)
