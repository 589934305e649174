"""Errors that cross HTTP read as they did where they were raised: nothing said twice."""

from __future__ import annotations

import pytest

from sidecar.daemon.upstream import HTTPUpstream
from sidecar.errors import PosMismatch
from tests.server.conftest import TOKEN, Running, uploads


async def test_a_position_mismatch_names_the_database_and_position_once(server: Running) -> None:
    """The server's `shop.db: upload … does not continue (current position …)` arrives as is at the sidecar."""
    first, second = (p.read_bytes() for p in uploads("fx-wal.db")[:2])
    upstream = HTTPUpstream(server.url, TOKEN, "default")
    try:
        await upstream.upload("shop.db", first)
        await upstream.upload("shop.db", second)
        with pytest.raises(PosMismatch) as info:
            await upstream.upload("shop.db", second)  # again: it no longer continues the position
    finally:
        await upstream.close()
    pos = server.engine.pos("default", "shop.db")
    assert info.value.pos == pos
    text = str(info.value)
    assert text.startswith("shop.db: upload 0000000000000011-0000000000000016 does not continue TXID "
                           f"{pos.txid:016x}")
    assert text.endswith(f" (current position {pos})")
    assert text.count("shop.db") == 1 and text.count("current position") == 1
