"""Where LTX files live: one async Storage interface, a local directory and S3-compatible stores."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sidecar.errors import ConfigError
from sidecar.storage.base import ObjectInfo, Storage
from sidecar.storage.layout import FILE_LAYOUT, S3_LAYOUT, SNAPSHOT_LEVEL, Layout, LTXKey


def open_storage(url: str, **s3_options: Any) -> Storage:
    """`file:///path` (or an absolute path) → a local directory; `s3://bucket/prefix` → S3."""
    parsed = urlparse(url)
    if parsed.scheme == "file" or (not parsed.scheme and url.startswith("/")):
        path = parsed.path if parsed.scheme else url
        if parsed.netloc:
            raise ConfigError([f"storage URL {url!r}: file URLs look like file:///absolute/path"])
        if not path.startswith("/"):
            raise ConfigError([f"storage URL {url!r}: the path must be absolute"])
        from sidecar.storage.file import FileStorage
        return FileStorage(Path(path))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError([f"storage URL {url!r}: no bucket; want s3://bucket/prefix"])
        from sidecar.storage.s3 import S3Storage
        opts = {k: v for k, v in s3_options.items() if v is not None}
        return S3Storage(parsed.netloc, parsed.path.strip("/"), **opts)
    raise ConfigError([f"storage URL {url!r}: unsupported scheme; want file:///path or s3://bucket/prefix"])


__all__ = ["FILE_LAYOUT", "S3_LAYOUT", "SNAPSHOT_LEVEL", "LTXKey", "Layout", "ObjectInfo", "Storage", "open_storage"]
