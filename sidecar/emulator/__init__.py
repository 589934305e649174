"""An emulated LiteFS node for tests and demos: real SQLite writes in, LiteFS's files and HTTP API out.

`EmulatedNode` writes what LiteFS 0.5 leaves in its data directory and mount (docs/litefs.md §2–§6),
`LoadWriter` drives a realistic write load through it, and `start_http` serves the node API subset a
sidecar uses (§7). Nothing in `sidecar` proper imports this package.
"""

from sidecar.emulator.http import make_app, start_http
from sidecar.emulator.load import LoadWriter
from sidecar.emulator.node import (
    DatabaseNotFound,
    EmulatedNode,
    EmulatorError,
    ReadOnlyReplica,
    Tx,
    expired_ltx_files,
)

__all__ = [
    "DatabaseNotFound",
    "EmulatedNode",
    "EmulatorError",
    "LoadWriter",
    "ReadOnlyReplica",
    "Tx",
    "expired_ltx_files",
    "make_app",
    "start_http",
]
