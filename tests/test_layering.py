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
