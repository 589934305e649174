"""One module per command group; each exposes `register(subparsers)`."""

from types import ModuleType

from sidecar.commands import admin, backup, demo, ltx, query, replicate, run, serve

COMMAND_MODULES: list[ModuleType] = [demo, run, serve, admin, backup, query, replicate, ltx]
