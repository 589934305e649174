"""An example application that keeps its data in SQLite through LiteFS (standard library only).

    python3 example_app.py migrate --db /litefs/app.db                  create the schema (idempotent)
    python3 example_app.py serve --addr :8081 --db /litefs/app.db       HTTP: GET / lists, POST / adds a note
    python3 example_app.py serve ... --write-every 2                    also add a note every 2 s (on the primary)

Behind LiteFS's proxy, POSTs are forwarded to the primary; on a replica the database is read-only.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

SCHEMA = "CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, at TEXT NOT NULL, body TEXT NOT NULL)"


def connect(db: str) -> sqlite3.Connection:
    con = sqlite3.connect(db, timeout=10, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA busy_timeout = 10000")
    return con


def is_primary(db: str) -> bool:
    """LiteFS writes `.primary` (the primary's hostname) into the mount on replicas only."""
    return not (Path(db).parent / ".primary").exists()


def add_note(db: str, body: str) -> int:
    con = connect(db)
    try:
        cur = con.execute("INSERT INTO notes (at, body) VALUES (?, ?)",
                          (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), body))
        return int(cur.lastrowid or 0)
    finally:
        con.close()


def make_handler(db: str) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _send(self, status: int, doc: object) -> None:
            body = (json.dumps(doc) + "\n").encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:
            if self.path == "/healthz":
                self._send(200, {"ok": True})
                return
            con = connect(db)
            try:
                count = con.execute("SELECT count(*) FROM notes").fetchone()[0]
                rows = con.execute("SELECT id, at, body FROM notes ORDER BY id DESC LIMIT 10").fetchall()
            finally:
                con.close()
            self._send(200, {"primary": is_primary(db), "count": count,
                             "latest": [{"id": i, "at": at, "body": b} for i, at, b in rows]})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length).decode("utf-8", "replace") or "hello"
            try:
                self._send(201, {"id": add_note(db, body)})
            except sqlite3.OperationalError as err:  # a replica reached without the proxy: read-only
                self._send(503, {"error": str(err)})

    return Handler


def writer(db: str, every: float, stop: threading.Event) -> None:
    """Add a note every `every` seconds while this node is the primary (the demo's write load)."""
    n = 0
    while not stop.wait(every):
        if is_primary(db):
            n += 1
            try:
                add_note(db, f"automatic note {n} from {os.uname().nodename}")
            except sqlite3.OperationalError as err:
                print(f"example_app: write failed: {err}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("migrate")
    m.add_argument("--db", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--db", required=True)
    s.add_argument("--addr", default=":8081")
    s.add_argument("--write-every", type=float, default=0.0, help="seconds between automatic notes; 0: none")
    args = parser.parse_args()
    if args.command == "migrate":
        con = connect(args.db)
        con.execute(SCHEMA)
        con.close()
        return
    host, _, port = args.addr.rpartition(":")
    stop = threading.Event()
    if args.write_every > 0:
        threading.Thread(target=writer, args=(args.db, args.write_every, stop), daemon=True).start()
    server = ThreadingHTTPServer((host, int(port)), make_handler(args.db))
    print(f"example_app: serving {args.db} on {args.addr}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        server.server_close()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM stops like Ctrl+C: a clean exit
    main()
