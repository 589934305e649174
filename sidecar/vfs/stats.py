"""What reading a backup in place cost, counted by every source."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Stats:
    """What reading a backup cost: requests and bytes received, LIST requests and head polls among them, pages."""

    requests: int = 0
    bytes: int = 0
    lists: int = 0
    polls: int = 0  # requests asking whether the latest state changed (conditional GETs, long-polls)
    pages_fetched: int = 0  # pages decompressed from frames received
    cache_hits: int = 0  # pages served from the page cache

    def snapshot(self) -> dict[str, int]:
        return {"requests": self.requests, "bytes": self.bytes, "lists": self.lists, "polls": self.polls,
                "pages_fetched": self.pages_fetched, "cache_hits": self.cache_hits}
