"""The LTX format, pure: bytes and binary streams in and out; no asyncio, paths or logging."""

from sidecar.ltx.errors import (
    ChecksumMismatch,
    CompactionError,
    CorruptCompression,
    InvalidHeader,
    InvalidPage,
    LTXError,
    TruncatedFile,
)
from sidecar.ltx.names import format_filename, parse_filename
from sidecar.ltx.types import (
    CHECKSUM_FLAG,
    FLAG_COMPRESS_LZ4,
    FLAG_NO_CHECKSUM,
    HEADER_SIZE,
    TRAILER_SIZE,
    Header,
    Pos,
    Trailer,
    Version,
    db_checksums,
    format_timestamp,
    format_txid,
    lock_pgno,
    parse_txid,
)

__all__ = [
    "CHECKSUM_FLAG",
    "FLAG_COMPRESS_LZ4",
    "FLAG_NO_CHECKSUM",
    "HEADER_SIZE",
    "TRAILER_SIZE",
    "ChecksumMismatch",
    "CompactionError",
    "CorruptCompression",
    "Header",
    "InvalidHeader",
    "InvalidPage",
    "LTXError",
    "Pos",
    "Trailer",
    "TruncatedFile",
    "Version",
    "db_checksums",
    "format_filename",
    "format_timestamp",
    "format_txid",
    "lock_pgno",
    "parse_filename",
    "parse_txid",
]
