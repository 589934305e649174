"""Argument types shared by the commands: a malformed value is a usage error (exit 2), named by argparse."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from urllib.parse import urlsplit

from sidecar.errors import SidecarError
from sidecar.storage.base import parse_rfc3339

TIMESTAMP_HELP = ("a time, RFC 3339: 2026-11-24T09:00:00Z or with an offset (+02:00); without one it is UTC; "
                  "a space may stand for the T, and seconds may be left out (2026-11-24 09:00)")
TXID_HELP = "a transaction ID in hex: 00000000000004d2 (leading zeros optional)"


def timestamp(text: str) -> int:
    """`--timestamp`: milliseconds since the epoch."""
    try:
        return parse_rfc3339(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: want a time such as 2026-11-24T09:00:00Z") from None


def txid(text: str) -> int:
    """`--txid`: a positive transaction ID, in hex."""
    try:
        value = int(text, 16)
    except ValueError:
        value = 0
    if value <= 0 or value >= 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r}: want a transaction ID in hex, e.g. 00000000000004d2")
    return value


def positive(text: str) -> float:
    """`--seconds`, `--poll-interval`: a number greater than 0 (not nan or infinity)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: want a number greater than 0")
    return value


def positive_int(text: str) -> int:
    """`--databases`: a whole number greater than 0."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want a whole number greater than 0")
    return value


def s3_endpoint(text: str) -> str:
    """`--s3-endpoint`: an http(s) URL of a host, with a port from 1 to 65535 if any."""
    try:
        url = urlsplit(text)
        port = url.port
    except ValueError:  # an unclosed [IPv6 literal, a port that is not a number or too large
        url, port = None, 0
    if url is None or url.scheme not in ("http", "https") or not url.hostname or port == 0:
        raise argparse.ArgumentTypeError(f"{text!r}: want http(s)://HOST[:PORT], e.g. https://fly.storage.tigris.dev")
    return text


def check_output(text: str) -> Path:
    """`-o FILE` of a command that writes a file: its directory must exist (it is never created on a guess, as
    `cp` does not); SidecarError (exit 1) before any work is done."""
    out = Path(text)
    parent = out.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise SidecarError(f"-o {text}: {parent} {why}")
    if out.is_dir():
        raise SidecarError(f"-o {text}: is a directory; give a file name")
    return out


__all__ = ["TIMESTAMP_HELP", "TXID_HELP", "check_output", "positive", "positive_int", "s3_endpoint",
           "timestamp", "txid"]
