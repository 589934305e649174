"""Read a backup in place: a read-only SQLite VFS over `file://`, `s3://` or a backup server, and replicas.

    vfs = BackupVFS()                                        # one per process: it owns an event loop thread
    con = vfs.connect("s3://bucket/backups/prod/app.db", timestamp=ms)   # an apsw.Connection, read-only
    con.execute("SELECT …").fetchall()
    vfs.close()

Design (see each module's docstring for the details):

- SQLite host: APSW (PyPI `apsw`). Python's `sqlite3` cannot register a VFS; APSW can, passes URI
  parameters and `PRAGMA` file controls through, re-raises a Python exception from a VFS method to the
  caller unchanged, and ships its own current SQLite.
- Sync callbacks, async storage: the storages are asyncio (aiobotocore, aiohttp). One event loop runs in a
  thread of the VFS; a callback that misses the page cache hands it a coroutine and waits
  (`vfs.LoopThread`). Cache hits never leave SQLite's thread.
- Page cache: an LRU of decompressed pages by (stored file, pgno), bounded in bytes (`cache_bytes`, 10 MiB
  by default, as Litestream's VFS). Stored files never change, so entries stay valid across new states.
- One TXID per read transaction: a connection pins a `View` (one plan) when SQLite takes the shared lock
  that starts a transaction, and changes it only at the next such lock. The VFS rewrites page 1's change
  counter to the TXID so SQLite drops its own page cache exactly when the TXID changes (plus a per-connection
  salt that changes when a database started over comes back to a TXID the connection read).
- Following: a per-URL follower task watches the head (server: long-poll; store: conditional GET of
  `head.json`, never LIST) and prepares the newest view; connections move to it at transaction starts.
- Where pages are: on a store, each plan file's page index (one ranged read per file; a big one by
  16 KiB windows); through a server, the server resolves them (`/db/pages`), so a reader holds no index.
- Vanished files (compaction or retention deleted them) make a new plan, not an error (`vfs.BackupFile`).
"""

from sidecar.vfs.source import Source, Stats, StoreSource, open_source
from sidecar.vfs.vfs import VFS_NAME, BackupVFS

__all__ = ["VFS_NAME", "BackupVFS", "Source", "Stats", "StoreSource", "open_source"]
