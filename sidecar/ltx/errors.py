"""The codec's exception tree; `ltx` imports nothing from `sidecar`, so it has its own root.

    LTXError(message, field=None, offset=None)   any invalid, corrupt or misused LTX data
    ├── InvalidHeader(field)                     a header field breaks the format rules
    ├── InvalidPage(offset)                      a page frame is malformed or out of order
    ├── TruncatedFile(offset)                    the data ends before the format says it should
    ├── ChecksumMismatch(field)                  a stored checksum disagrees with the data
    ├── CorruptCompression(offset)               an LZ4 frame or block does not decode
    └── CompactionError                          inputs that cannot be merged (gap, page size)

Every message names the field or byte offset so `ltx verify` can print it as is.
"""

from __future__ import annotations


class LTXError(Exception):
    """Invalid, corrupt or misused LTX data."""

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None) -> None:
        self.field = field
        self.offset = offset
        if offset is not None:
            message = f"{message} (at byte {offset})"
        super().__init__(message)


class InvalidHeader(LTXError):
    """A header field breaks the format rules; `field` names it."""


class InvalidPage(LTXError):
    """A page frame is malformed, out of order or out of range."""


class TruncatedFile(LTXError):
    """The data ended before the format says it should."""


class ChecksumMismatch(LTXError):
    """A stored checksum (file, pre-apply or post-apply) disagrees with the data."""


class CorruptCompression(LTXError):
    """An LZ4 frame or block is corrupt or decodes to the wrong size."""


class CompactionError(LTXError):
    """Inputs that cannot be merged: a TXID gap, mismatched page sizes, or no input."""
