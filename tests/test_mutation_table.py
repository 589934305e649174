"""tools/mutate.py's table of invariant-holding functions still matches the tree (functions move between modules)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).parent.parent / "tools" / "mutate.py"


@pytest.fixture(scope="module")
def mutate() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutate", SCRIPT)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["mutate"] = module  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["mutate"]
    return module


def test_every_function_and_test_file_in_the_table_exists(mutate: ModuleType) -> None:
    """A function moved to another module fails here until its row in TARGETS follows it."""
    assert mutate.check_table(mutate.TARGETS) == []


def test_a_moved_function_is_reported(mutate: ModuleType) -> None:
    moved = mutate.Target("x", "sidecar/engine/restore.py", ("retention_victims", "plan_restore"), ("tests/nope.py",))
    assert mutate.check_table((moved,)) == ["x: retention_victims is not in sidecar/engine/restore.py",
                                            "x: test tests/nope.py does not exist"]


def test_mutant_names(mutate: ModuleType) -> None:
    """The globs follow mutmut's names for functions and methods."""
    t = mutate.Target("x", "sidecar/server/app.py", (), ())
    assert mutate.mutant_glob(t, "parse_tokens") == "sidecar.server.app.x_parse_tokens__mutmut_*"
    assert mutate.mutant_glob(t, "Server.token_scope") == "sidecar.server.app.xǁServerǁtoken_scope__mutmut_*"
    assert mutate.mutant_glob(t, "*") == "sidecar.server.app.x*__mutmut_*"
