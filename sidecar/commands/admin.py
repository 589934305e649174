"""`litefs-sidecar admin list|show|restore|download|upload|clone|delete`: the operator API of a running server.

Each subcommand is one or a few requests to `litefs-sidecar serve` (see `sidecar.server.operator`), made with
the admin token from LITEFS_SIDECAR_SERVER_ADMIN_TOKEN: the same variable the server reads, and like every
secret, only from the environment. The server is `--server URL`, or else the `[server] addr` that `serve`
would listen on (so on the server's host, with its `--config`, no flag is needed).

Output is a table for people, or the server's JSON with `--json`. A refusal from the server prints as one
line, `litefs-sidecar: the server answered <status> <code>: <url>: <why>`, and exits 1. The client's options
(--server, --config, --json) may come before or after the subcommand.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlencode, urlsplit

from sidecar.commands import args as argtypes
from sidecar.config import load
from sidecar.errors import SidecarError
from sidecar.ltx import format_timestamp

HINTS = {
    401: "set LITEFS_SIDECAR_SERVER_ADMIN_TOKEN to the server's admin token",
    0: "is `litefs-sidecar serve` running there? Give its address with --server URL",
}


EXAMPLES = """\
examples:
  litefs-sidecar admin list                                        every cluster and database
  litefs-sidecar admin --server http://backup-host:20203 list      another server
  litefs-sidecar admin show --db app.db                            one database's restore points
  litefs-sidecar admin restore --db app.db --timestamp 2026-11-24T09:00:00Z
  litefs-sidecar admin download --db app.db --txid 00000000000004d2 -o app.db
  litefs-sidecar admin clone --cluster prod --to-cluster staging   every database of a cluster

The admin token comes from LITEFS_SIDECAR_SERVER_ADMIN_TOKEN; the server from --server URL (before or after
the subcommand) or the [server] addr of --config FILE (default http://127.0.0.1:20203). Database commands
act on --cluster default.
"""


def register(sub: Any) -> None:
    """Add the `admin` command group."""
    p = sub.add_parser("admin", help="operate a running backup server: list, restore, download, upload, clone, "
                       "delete", description="Call the operator API of `litefs-sidecar serve`.", epilog=EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_subparsers(dest="admin_command", metavar="SUBCOMMAND", required=True)
    # The client's options go before or after the subcommand (`admin --server URL list` as in git or kubectl).
    # After it they default to SUPPRESS, so that a value given before it is not overwritten by a default.
    _client_flags(p, default=None)
    common = argparse.ArgumentParser(add_help=False)
    _client_flags(common, default=argparse.SUPPRESS)
    one = argparse.ArgumentParser(add_help=False, parents=[common])
    one.add_argument("--cluster", default="default", help="the database's cluster (default %(default)s)")
    one.add_argument("--db", required=True, metavar="NAME", help="the database, as LiteFS names it: app.db")

    def add(name: str, parents: list[argparse.ArgumentParser], help: str, examples: str) -> argparse.ArgumentParser:
        q: argparse.ArgumentParser = group.add_parser(
            name, parents=parents, help=help, description=help[0].upper() + help[1:] + ".",
            epilog="examples:\n" + examples, formatter_class=argparse.RawDescriptionHelpFormatter)
        return q

    q = add("list", [common], "list clusters and databases: position, HWM, lag, size and restore points",
            "  litefs-sidecar admin list\n  litefs-sidecar admin list --cluster prod --json\n"
            "  litefs-sidecar admin list --server https://backups.internal:20203\n")
    q.add_argument("--cluster", help="only this cluster (default: all)")
    q.set_defaults(func=cmd_list)

    q = add("show", [one], "show one database, what each level can restore, and every restore point",
            "  litefs-sidecar admin show --db app.db\n  litefs-sidecar admin show --cluster prod --db app.db --json\n")
    q.set_defaults(func=cmd_show)

    q = add("restore", [one], "restore a database to a time or TXID, appended as a new head transaction",
            "  litefs-sidecar admin restore --db app.db --timestamp 2026-11-24T09:00:00Z\n"
            "  litefs-sidecar admin restore --cluster prod --db app.db --txid 00000000000004d2\n\n"
            "History is kept, so a restore can be undone by restoring the TXID it replaced. LiteFS primaries find\n"
            "the server ahead of them and pull the restored state, as they did from LiteFS Cloud.\n")
    _target(q, required=True)
    q.set_defaults(func=cmd_restore)

    q = add("download", [one], "download a database, latest or at a time or TXID, as a SQLite file",
            "  litefs-sidecar admin download --db app.db -o app.db\n"
            "  litefs-sidecar admin download --db app.db --timestamp 2026-11-24T09:00:00Z -o before.db\n"
            "  litefs-sidecar admin download --db app.db --format ltx -o app.ltx     an LTX v2 snapshot\n")
    _target(q, required=False)
    q.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write (replaced atomically)")
    q.add_argument("--format", choices=["sqlite", "ltx"], default="sqlite", help="(default %(default)s)")
    q.set_defaults(func=cmd_download)

    q = add("upload", [one], "upload a SQLite file as a database's new head transaction",
            "  litefs-sidecar admin upload --db app.db ./app.db\n"
            "  litefs-sidecar admin upload --cluster staging --db app.db /backups/app-2026-11-24.db\n")
    q.add_argument("file", metavar="FILE", help="a SQLite database file (checkpointed: its -wal is not read)")
    q.set_defaults(func=cmd_upload)

    q = add("clone", [common], "copy a database, or every database of a cluster, into another cluster",
            "  litefs-sidecar admin clone --db app.db --to-cluster staging\n"
            "  litefs-sidecar admin clone --db app.db --to-cluster staging --to-db app-copy.db\n"
            "  litefs-sidecar admin clone --cluster prod --to-cluster staging     the whole cluster\n")
    q.add_argument("--cluster", default="default", help="the source cluster (default %(default)s)")
    q.add_argument("--db", metavar="NAME", help="the database to copy (default: every one)")
    q.add_argument("--to-cluster", required=True, metavar="CLUSTER")
    q.add_argument("--to-db", metavar="NAME", help="the copy's name (default: the same; only with --db)")
    q.set_defaults(func=cmd_clone)

    q = add("delete", [one], "delete a database and every backup of it",
            "  litefs-sidecar admin delete --cluster staging --db app.db --yes\n")
    q.add_argument("--yes", action="store_true", help="really delete: there is no undo")
    q.set_defaults(func=cmd_delete)


def _client_flags(p: argparse.ArgumentParser, *, default: Any) -> None:
    p.add_argument("--server", metavar="URL", type=server_url, default=default,
                   help="the backup server: http(s)://HOST:PORT, or HOST:PORT for http (default: the [server] addr, "
                        "http://127.0.0.1:20203)")
    p.add_argument("--config", metavar="FILE", default=default,
                   help="TOML file whose [server] addr is the default --server")
    p.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                   help="print JSON, for scripts")


def server_url(text: str) -> str:
    """`--server`: an http(s) URL of a host, or a bare HOST:PORT taken as http; anything else is bad usage."""
    url = text if "://" in text else f"http://{text}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise argparse.ArgumentTypeError(f"{text!r}: the backup server speaks http or https, not {parts.scheme}")
    try:
        parts.port  # noqa: B018  (raises ValueError for a port that is not a number)
    except ValueError:
        parts = parts._replace(netloc="")
    if not parts.hostname:
        raise argparse.ArgumentTypeError(f"{text!r}: want http://HOST:PORT, https://HOST:PORT or HOST:PORT")
    return url


def _target(p: argparse.ArgumentParser, *, required: bool) -> None:
    target = p.add_mutually_exclusive_group(required=required)
    target.add_argument("--timestamp", metavar="T", type=argtypes.timestamp, help=argtypes.TIMESTAMP_HELP)
    target.add_argument("--txid", metavar="HEX", type=argtypes.txid, help=argtypes.TXID_HELP)


def _target_params(a: argparse.Namespace) -> dict[str, str]:
    """--timestamp or --txid as the operator API takes them (RFC 3339 in UTC, 16 hex digits); {} for neither."""
    if a.timestamp is not None:
        return {"timestamp": format_timestamp(a.timestamp)}
    if a.txid is not None:
        return {"txid": f"{a.txid:016x}"}
    return {}


@dataclass(frozen=True)
class OperatorClient:
    """The operator API over HTTP. Synchronous (one command, one request at a time); refusals → Refused."""

    url: str
    token: str = ""
    timeout: float = 600.0

    def open(self, method: str, path: str, params: Mapping[str, str], *, body: bytes | IO[bytes] | None = None,
             headers: Mapping[str, str] | None = None) -> Any:
        """Send one request; the response is a file-like object, to be closed by the caller."""
        url = f"{self.url.rstrip('/')}{path}?{urlencode({k: v for k, v in params.items() if v})}"
        h = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        req = urllib.request.Request(url, data=body, method=method, headers={**h, **(headers or {})})
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as err:  # the server answered: a JSON {code, error} if it is ours
            with err:
                text = err.read(65536).decode(errors="replace")
            try:
                data = json.loads(text)
                code, why = str(data["code"]), str(data["error"])
            except (ValueError, KeyError, TypeError):
                code, why = "EHTTP", text.strip() or str(err.reason)
            raise Refused(err.code, code, f"{url.split('?')[0]}: {why}") from None
        except OSError as err:  # refused, reset, timed out, unresolvable
            reason = getattr(err, "reason", None) or err
            reason = getattr(reason, "strerror", None) or reason
            unreachable = SidecarError(f"cannot reach the backup server at {self.url}: {reason}")
            unreachable.hint = HINTS[0]  # type: ignore[attr-defined]
            raise unreachable from None

    def json(self, method: str, path: str, params: Mapping[str, str], payload: Any = None) -> Any:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"} if body is not None else {}
        with self.open(method, path, params, body=body, headers=headers) as resp:
            return json.load(resp)


class Refused(SidecarError):
    """The backup server answered with an error: `status`, its `code` (ENODB, ENOTXID, …) and why."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.server_code = status, code
        self.hint = HINTS.get(status, "")  # cli.main prints it
        super().__init__(f"the server answered {status} {code}: {message}")


def client(args: argparse.Namespace) -> OperatorClient:
    """The server to talk to and the token, from --server, the [server] section and the environment."""
    server = load(["server"], config_file=args.config).server
    url = args.server
    if not url:
        host, _, port = server.addr.rpartition(":")
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "[::]": "[::1]"}.get(host, host)  # listening on all
        url = f"http://{host}:{port}"
    return OperatorClient(url, server.admin_token)


# -- output ----------------------------------------------------------------------------------------------


def table(headers: Sequence[str], rows: Sequence[Sequence[object]], right: Sequence[str] = ()) -> str:
    """Columns padded to their widest cell; the columns named in `right` are right-aligned (numbers)."""
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = []
    for row in cells:
        parts = [c.rjust(w) if h in right else c.ljust(w) for c, w, h in zip(row, widths, headers, strict=True)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def size(n: int) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 3.2 MiB."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _emit(args: argparse.Namespace, data: Any, text: str) -> int:
    print(json.dumps(data, indent=2) if args.json else text)
    return 0


# -- subcommands -----------------------------------------------------------------------------------------


def cmd_list(args: argparse.Namespace) -> int:
    data = client(args).json("GET", "/api/databases", {"cluster": args.cluster or ""})
    rows = [[c["name"], d["name"], d["txid"], d["hwm"], d["lag"], size(d["size"]), d["files"], d["restorePoints"],
             d.get("oldest", "-"), d.get("newest", "-")]
            for c in data["clusters"] for d in c["databases"]]
    headers = ["CLUSTER", "DB", "TXID", "HWM", "LAG", "SIZE", "FILES", "POINTS", "OLDEST", "NEWEST"]
    return _emit(args, data, table(headers, rows, right=["LAG", "SIZE", "FILES", "POINTS"]) if rows
                 else "no databases")


def cmd_show(args: argparse.Namespace) -> int:
    d = client(args).json("GET", "/api/db", _params(args))
    head = (f"{d['cluster']}/{d['name']}: TXID {d['txid']} (checksum {d['postApplyChecksum']}), HWM {d['hwm']}, "
            f"lag {d['lag']}, {size(d['size'])} in {d['files']} files")
    if not d["points"]:
        return _emit(args, d, f"{head}\nno restore points")
    levels = table(["LEVEL", "EVERY", "POINTS", "OLDEST", "NEWEST"],
                   [[f"L{lv['level']}", every(lv["interval"]), lv["points"], lv["oldest"], lv["newest"]]
                    for lv in d["levels"]], right=["POINTS"])
    points = table(["LEVEL", "TXID", "TIMESTAMP"], [[f"L{p['level']}", p["txid"], p["timestamp"]] for p in d["points"]])
    return _emit(args, d, f"{head}\n\nrestorable, per level:\n{levels}\n\nrestore points:\n{points}")


def every(interval: float | None) -> str:
    """How far apart a level's restore points are: `upload` (each one), `10s`, `5m`, `1h`, `24h`; `-` unknown."""
    if interval is None:
        return "-"
    if interval <= 0:
        return "upload"
    for unit, seconds in (("h", 3600), ("m", 60)):
        if interval >= seconds and interval % seconds == 0:
            return f"{interval / seconds:g}{unit}"
    return f"{interval:g}s"


def cmd_restore(args: argparse.Namespace) -> int:
    d = client(args).json("POST", "/api/restore", _params(args), _target_params(args))
    r = d["restored"]
    return _emit(args, d, f"{args.cluster}/{args.db}: restored TXID {r['txid']} ({r['timestamp']}) as the new head, "
                          f"TXID {d['txid']}; earlier states stay restorable")


def cmd_download(args: argparse.Namespace) -> int:
    params = {**_params(args), **_target_params(args), "format": args.format}
    out = argtypes.check_output(args.output)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    except OSError as err:
        raise SidecarError(f"{out}: {err.strerror or err}") from None
    try:
        with client(args).open("GET", "/api/download", params) as resp, os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(resp, f, 1 << 20)
            # http.client returns a body cut short by a dropped connection as if it were whole: count it.
            want, got = resp.headers.get("Content-Length"), f.tell()
            if want is not None and want.isdigit() and int(want) != got:
                raise SidecarError(f"download of {args.cluster}/{args.db} cut short: the connection dropped after "
                                   f"{got} of {want} bytes; nothing was written to {out}")
            f.flush()
            os.fsync(f.fileno())
            txid = resp.headers.get("Litefs-Txid", "")
        os.replace(tmp, out)  # a complete file or none: never half a database under the requested name
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    n = out.stat().st_size
    what = "SQLite database" if args.format == "sqlite" else "LTX snapshot"
    return _emit(args, {"path": str(out), "bytes": n, "txid": txid},
                 f"wrote {out}: {what} of {args.cluster}/{args.db} at TXID {txid}, {size(n)}")


def cmd_upload(args: argparse.Namespace) -> int:
    path = Path(args.file)
    wal = path.with_name(path.name + "-wal")
    if wal.exists() and wal.stat().st_size:
        print(f"warning: {wal} is not empty: commits in it are not in {path} (checkpoint first)", file=sys.stderr)
    try:
        f = open(path, "rb")
    except OSError as err:
        raise SidecarError(f"{path}: {err.strerror or err}") from None
    with f:
        headers = {"Content-Length": str(os.fstat(f.fileno()).st_size), "Content-Type": "application/vnd.sqlite3"}
        with client(args).open("POST", "/api/upload", _params(args), body=f, headers=headers) as resp:
            d = json.load(resp)
    return _emit(args, d, f"{args.cluster}/{args.db}: uploaded {path} as the new head, TXID {d['txid']}; "
                          "earlier states stay restorable")


def cmd_clone(args: argparse.Namespace) -> int:
    api = client(args)
    if args.db:
        names = [args.db]
    else:  # the whole cluster, one database at a time
        data = api.json("GET", "/api/databases", {"cluster": args.cluster})
        names = [d["name"] for c in data["clusters"] for d in c["databases"]]
    results = []
    failed = 0
    for name in names:
        to_db = args.to_db if args.db and args.to_db else name
        try:
            results.append(api.json("POST", "/api/clone", {"cluster": args.cluster, "db": name,
                                                           "to_cluster": args.to_cluster, "to_db": to_db}))
        except Refused as err:
            if args.db:
                raise
            failed += 1  # one database's failure is its own: the cluster's others are still cloned
            print(f"litefs-sidecar: clone of {args.cluster}/{name}: {err}", file=sys.stderr)
            continue
        if not args.json:
            print(f"cloned {args.cluster}/{name} to {args.to_cluster}/{to_db} at TXID {results[-1]['txid']}")
    if args.json:
        print(json.dumps(results, indent=2))
    elif not names:
        print(f"cluster {args.cluster!r} has no databases")
    return 1 if failed else 0


def cmd_delete(args: argparse.Namespace) -> int:
    if not args.yes:
        print(f"litefs-sidecar: refusing to delete {args.cluster}/{args.db} and all of its backups without --yes",
              file=sys.stderr)
        return 2
    d = client(args).json("DELETE", "/api/db", _params(args))
    return _emit(args, d, f"deleted {args.cluster}/{args.db}: {d['deleted']} files")


def _params(args: argparse.Namespace) -> dict[str, str]:
    return {"cluster": args.cluster, "db": args.db}
