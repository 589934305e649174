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


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def sidecar_imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, imported names) of every `sidecar` import anywhere in the file, functions included."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.startswith("sidecar")]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level and node.module.startswith("sidecar"):
            out.append((node.module, [a.name for a in node.names]))
    return out


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for target, names in sidecar_imports(path):
            for name in names or [""]:
                full = f"{target}.{name}" if name else target
                edges[mod].add(full if full in modules else target)
    return edges


def test_no_import_cycles() -> None:
    """Imports point one way (no cycle, not even through a function-level import)."""
    edges = graph()
    done: set[str] = set()

    def visit(mod: str, stack: list[str]) -> None:
        if mod in stack:
            raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(mod):], mod]))
        if mod in done or mod not in edges:
            return
        for nxt in sorted(edges[mod]):
            if nxt != mod and not mod.startswith(nxt + "."):  # a package's own __init__ re-exports
                visit(nxt, [*stack, mod])
        done.add(mod)

    for mod in sorted(edges):
        visit(mod, [])


def test_no_private_names_imported_across_modules() -> None:
    for path in PACKAGE.rglob("*.py"):
        for target, names in sidecar_imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module_name(path)} imports private {private} from {target}"


LAYERS = {  # a package never imports the ones listed for it
    "sidecar.storage": ("sidecar.engine", "sidecar.server", "sidecar.daemon", "sidecar.commands", "sidecar.vfs"),
    "sidecar.engine": ("sidecar.server", "sidecar.daemon", "sidecar.commands", "sidecar.vfs"),
    "sidecar.server": ("sidecar.daemon", "sidecar.commands", "sidecar.vfs"),
    "sidecar.vfs": ("sidecar.server", "sidecar.daemon", "sidecar.commands"),
    "sidecar.daemon": ("sidecar.server", "sidecar.commands"),
}


def test_layers_point_one_way() -> None:
    for path in PACKAGE.rglob("*.py"):
        mod = module_name(path)
        for package, forbidden in LAYERS.items():
            if mod == package or mod.startswith(package + "."):
                for target, _ in sidecar_imports(path):
                    assert not target.startswith(forbidden), f"{mod} imports {target}"


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
