"""One module per command group; each exposes `register(subparsers)`."""

from types import ModuleType

from sidecar.commands import backup, ltx, run, serve

COMMAND_MODULES: list[ModuleType] = [run, serve, backup, ltx]
