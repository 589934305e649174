"""The wire format of the LiteFS Cloud protocol and our extensions, in one place (docs/litefs.md §9).

The server writes it; the sidecar's HTTP upstream and the `admin` client read it.

    position      {"txid": "<16 hex>", "postApplyChecksum": "<16 hex>"}
    /pos          {"<db>": position, ...}
    error         {"code": "EPOSMISMATCH", "error": "<why>"[, "pos": position]}     any 4xx or 5xx we send

Errors keep their type across HTTP: a 409 `EPOSMISMATCH` becomes `PosMismatch` again on the client, anything
else `UpstreamError(status, code)` (LiteFS's backup client does the same).
"""

from __future__ import annotations

import json
from typing import Any

from sidecar.errors import PosMismatch, UpstreamError
from sidecar.ltx import Pos, parse_txid

HWM_HEADER = "Litefs-Hwm"  # the HWM after an accepted upload
TXID_HEADER = "Litefs-Txid"  # the TXID a snapshot or download holds
INSTANCE_HEADER = "Lfsc-Instance-Id"  # which server process answered
REQUEST_ID_HEADER = "X-Request-Id"
CLUSTER_HEADER = "Litefs-Cluster"  # the cluster, for an admin token (as `?cluster=`)


def txid_hex(txid: int) -> str:
    """A TXID as the protocol writes it: 16 hex digits."""
    return f"{txid:016x}"


def hex_txid(text: object) -> int | None:
    """A TXID given as 1 to 16 hex digits (a query parameter, a JSON field); None for anything else, including what
    int(text, 16) alone would also take: a sign, "0x", "_" or spaces."""
    if not (isinstance(text, str) and 1 <= len(text) <= 16 and all(c in "0123456789abcdefABCDEF" for c in text)):
        return None
    return int(text, 16)


def pos_to_json(pos: Pos) -> dict[str, str]:
    return {"txid": txid_hex(pos.txid), "postApplyChecksum": f"{pos.post_apply_checksum:016x}"}


def pos_from_json(doc: Any) -> Pos:
    """A position from its JSON object; ValueError if it is not one."""
    try:
        return Pos(parse_txid(doc["txid"]), parse_txid(doc["postApplyChecksum"]))
    except (KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"not a position: {doc!r:.100}") from err


def positions_from_json(body: bytes) -> dict[str, Pos]:
    """The `/pos` answer; ValueError if it is not one."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    return {str(db): pos_from_json(p) for db, p in doc.items()}


def error_json(code: str, message: str, pos: Pos | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"code": code, "error": message}
    if pos is not None:
        body["pos"] = pos_to_json(pos)
    return body


def read_error(body: bytes) -> tuple[str, str, Pos | None]:
    """(code, message, position) of an error answer; a body that is not ours gives ("", its text, None)."""
    try:
        doc = json.loads(body)
        code, message = str(doc["code"]), str(doc["error"])
    except (ValueError, KeyError, TypeError):
        return "", body[:200].decode("utf-8", "replace").strip(), None
    try:
        pos = pos_from_json(doc["pos"]) if doc.get("pos") else None
    except ValueError:
        pos = None
    return code, message, pos


def raise_for(status: int, body: bytes, db: str, what: str) -> None:
    """Raise the error an answer stands for: PosMismatch for a 409 EPOSMISMATCH, else UpstreamError."""
    code, message, pos = read_error(body)
    if status == 409 and code == "EPOSMISMATCH":
        raise PosMismatch(db, pos or Pos(), message or "position mismatch")
    raise UpstreamError(status, code or "EHTTP", f"{what}: {message or 'no reason given'}")


__all__ = ["CLUSTER_HEADER", "HWM_HEADER", "INSTANCE_HEADER", "REQUEST_ID_HEADER", "TXID_HEADER", "error_json",
           "hex_txid",
           "pos_from_json", "pos_to_json", "positions_from_json", "raise_for", "read_error", "txid_hex"]
