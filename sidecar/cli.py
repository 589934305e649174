"""litefs-sidecar's command line: `main(argv) -> int` dispatches to one module per command group.

Each module in `sidecar.commands` exposes `register(subparsers)`, which adds its subcommands and sets
`func(args) -> int` on them. Errors print one line to stderr (plus a hint when there is one); exit 1 on
failure, 2 on bad usage or input (argparse's own errors, malformed values, configuration), for every
command alike: malformed values are rejected by argument types (`sidecar.commands.args`), so argparse
names the flag.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Sequence

from sidecar import __version__
from sidecar.commands import COMMAND_MODULES
from sidecar.errors import ConfigError, SidecarError
from sidecar.ltx import LTXError
from sidecar.malloc import limit_arenas

EPILOG = """\
examples:
  litefs-sidecar demo                                    emulated LiteFS node + sidecar + engine, then a restore
  litefs-sidecar run --data-dir /var/lib/litefs --upstream file:///var/lib/litefs-sidecar/backups
  litefs-sidecar serve --tokens /etc/litefs-sidecar/tokens --storage s3://bucket/backups
  litefs-sidecar restore --timestamp 2026-11-24T09:00:00Z -o app.db file:///backups/default/app.db
  litefs-sidecar ltx verify /var/lib/litefs/dbs/app.db/ltx/*.ltx

exit status, the same for every command:
  0    done
  1    failed: a restore, an upload, a check, a server's refusal (the message says why)
  2    bad usage or input: an unknown flag, a malformed TXID, time, URL or setting; nothing was done
  130  interrupted (Ctrl+C)    141  stdout closed by its reader (| head)
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree."""
    parser = argparse.ArgumentParser(
        prog="litefs-sidecar", description="Back up and restore LiteFS clusters.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"litefs-sidecar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the process exit code."""
    limit_arenas()  # before any thread starts
    try:
        try:
            return _run(argv)
        finally:  # also after --help and usage errors (SystemExit): a closed pipe shows here, not at exit
            sys.stdout.flush()
    except BrokenPipeError:
        # `litefs-sidecar ls URL | head -1`: the reader has all it wants. Exit quietly, as Unix tools do when
        # SIGPIPE ends them (status 128 + 13), and point stdout at /dev/null so that the interpreter's final
        # flush of what is still buffered cannot fail again (the recipe in Python's `signal` module docs).
        _stdout_to_devnull()
        return 141


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # as given: `serve --workers` starts itself again
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return 2
    try:
        return int(func(args))
    except ConfigError as err:
        print(f"litefs-sidecar: {err}", file=sys.stderr)
        return 2
    except (SidecarError, LTXError) as err:
        print(f"litefs-sidecar: {err}", file=sys.stderr)
        hint = getattr(err, "hint", None)
        if hint:
            print(f"hint: {hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        raise  # main's: a reader that has all it wants
    except OSError as err:  # the system's refusal (a full disk, a missing or unwritable path): it names the file
        print(f"litefs-sidecar: {err}", file=sys.stderr)
        return 1
    except sqlite3.Error as err:  # a database SQLite refuses or keeps locked (replicate onto a copy in use)
        print(f"litefs-sidecar: SQLite: {err}", file=sys.stderr)
        return 1


def _stdout_to_devnull() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file descriptor (a test's capture): nothing to silence
        pass


if __name__ == "__main__":
    sys.exit(main())
