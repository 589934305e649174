"""The package's layering: `sidecar.ltx` is pure (bytes and streams only) and imports nothing above it."""

from __future__ import annotations

import ast
from pathlib import Path

import sidecar

PACKAGE = Path(sidecar.__file__).parent
FORBIDDEN_IN_LTX = {"asyncio", "logging", "structlog", "pathlib", "aiohttp", "aiobotocore", "watchfiles"}


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_ltx_is_pure() -> None:
    files = sorted((PACKAGE / "ltx").glob("*.py"))
    assert files
    for path in files:
        for name in imports(path):
            top = name.split(".")[0]
            assert top not in FORBIDDEN_IN_LTX, f"{path.name} imports {name}"
            if top == "sidecar":
                assert name.startswith("sidecar.ltx"), f"{path.name} imports {name}"


def test_readers_and_server_stay_apart() -> None:
    """`sidecar.vfs` reads backups through the engine's pure parts and storage; the server never imports it,
    nor it the server, daemon or commands."""
    for path in sorted((PACKAGE / "vfs").glob("*.py")):
        for name in imports(path):
            assert not name.startswith(("sidecar.server", "sidecar.daemon", "sidecar.commands")), \
                f"vfs/{path.name} imports {name}"
    for path in sorted((PACKAGE / "server").glob("*.py")):
        assert not any(n.startswith("sidecar.vfs") for n in imports(path)), f"server/{path.name} imports sidecar.vfs"
    assert not any(n.startswith(("asyncio", "sidecar.storage.file", "sidecar.storage.s3"))
                   for n in imports(PACKAGE / "engine" / "head.py")), "engine/head.py must stay pure"
