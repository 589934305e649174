"""One module per command group; each exposes `register(subparsers)`."""

from types import ModuleType

from sidecar.commands import backup, ltx

COMMAND_MODULES: list[ModuleType] = [backup, ltx]
