"""Mutation testing of the code that holds litefs-sidecar's invariants: prints the score and every surviving mutant.

    python tools/mutate.py                      # every target in TARGETS, ~20 minutes on 2 busy cores
    python tools/mutate.py --only uploadlog     # one or more targets by name
    python tools/mutate.py --list               # the table, checked against the source

Each surviving mutant is printed as file:line and the diff mutmut applied; docs/mutation.md lists those left and
why each is equivalent or out of reach, with the last full run's score (1018 mutants: 95.7%, 90.5% by the tests
alone). Not in CI: it runs the fast tests once per mutant.

How: `sidecar/`, `tests/` and `pyproject.toml` are copied to a scratch directory, a `[tool.mutmut]` section naming
the target files and their tests is added there, and mutmut runs in it, so this checkout is never modified. mutmut
first runs the tests once to record which test reaches which function, then, per mutant, runs only the tests that
reached its function (with `-x`). Mutants that mypy (strict, as CI runs it) rejects count as caught: such a change
cannot land. Lines that only log are not mutated: log wording is no invariant.

Why mutmut (3.x) rather than cosmic-ray: both were run on sidecar/engine/uploadlog.py with the same two test files.
mutmut made 371 mutants and judged them all in 9.7 minutes (2 workers): it forks each mutant from a process that
has already imported pytest and the project, and runs only the tests that reach the mutated function. cosmic-ray
made 535 mutants (eleven replacements per binary operator, and many equivalent ones such as `|` -> `+` on disjoint
open() flags) and judged 46 in 10 minutes, about 13 s each, because every mutant starts a fresh pytest (aiohttp,
moto and hypothesis imports included): about 2 hours for that one module. cosmic-ray also selects by module only
(a function list needs a custom filter over its session database) and rewrites the source file in place while it
runs, so an interrupted run leaves a mutant behind. mutmut names each mutant after its function
(`sidecar.engine.engine.x_retention_victims__mutmut_3`), so the table below can name functions, and it can drop
mutants that mypy rejects. Its weak spot, string mutants in messages ("XXtextXX"), stays visible as survivors.

Install: `pip install -e '.[mutation]'` (mutmut 3.x).
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    """Functions of one module whose mutants count, and the fast test files that cover them."""

    name: str
    path: str  # relative to the repository root
    functions: tuple[str, ...]  # "func", "Class.method", or "*" for every function of the module
    tests: tuple[str, ...]  # test files or node ids, relative to the repository root


# The one table: when a function moves to another module (engine/accept.py, engine/retention.py, ...), change its
# row here; `--list` checks that every function named exists where the table says.
TARGETS: tuple[Target, ...] = (
    Target("ltx-checksum", "sidecar/ltx/checksum.py", ("*",),
           ("tests/ltx/test_checksum_rule.py", "tests/ltx/test_checksum.py", "tests/ltx/test_golden.py")),
    Target("ltx-compaction", "sidecar/ltx/compactor.py", ("*",),
           ("tests/ltx/test_compactor.py", "tests/ltx/test_properties.py", "tests/ltx/test_golden.py")),
    Target("upload-validation", "sidecar/engine/accept.py",
           ("check_upload", "check_header", "check_continues", "Intake.accept", "Intake._change", "Intake._logged"),
           ("tests/engine/test_write_tx.py", "tests/invariants/test_contiguity.py", "tests/server/test_ingest.py")),
    Target("page-checksums", "sidecar/engine/pagesums.py", ("PageSums.change", "PageSums.apply", "PageSums.from_pages"),
           ("tests/server/test_ingest.py", "tests/invariants/test_contiguity.py", "tests/engine/test_write_tx.py")),
    Target("uploadlog", "sidecar/engine/uploadlog.py", ("*",),
           ("tests/engine/test_uploadlog_edges.py", "tests/engine/test_uploadlog.py",
            "tests/invariants/test_uploadlog_durability.py")),
    Target("retention", "sidecar/engine/retention.py", ("retention_victims",),
           ("tests/engine/test_retention_victims.py", "tests/invariants/test_retention.py")),
    Target("restore-plan", "sidecar/engine/restore.py", ("plan_restore",),
           ("tests/engine/test_restore_plan_exact.py", "tests/engine/test_restore_plan.py",
            "tests/invariants/test_retention.py",
            "tests/invariants/test_restore_checksum.py")),
    Target("prune-under-hwm", "sidecar/daemon/local.py", ("prune_victims",),
           ("tests/daemon/test_prune_victims.py", "tests/daemon/test_prune_property.py")),
    Target("leases", "sidecar/engine/lease.py", ("Leases.holds", "Leases.fence", "Leases.live", "Leases.acquire",
                                                 "Leases._write"),
           ("tests/engine/test_leases.py",)),
    Target("tokens", "sidecar/server/auth.py", ("Tokens.scope", "Tokens.from_header", "parse_tokens"),
           ("tests/server/test_tokens.py", "tests/server/test_hostile.py")),
)

# Lines matching these are not mutated (whole statements, however many lines they span).
NOT_MUTATED = [r"^\s*(log|self\.log)\.(debug|info|warning|error|exception)\("]

DETECTED = {"killed", "timeout", "caught by type check", "segfault"}
UNDETECTED = {"survived", "no tests", "suspicious"}


# -- the table -------------------------------------------------------------------------------------------------------


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def mutant_glob(target: Target, function: str) -> str:
    """mutmut's name for the mutants of one function: `x_func` and `xǁClassǁmethod`, then `__mutmut_<n>`."""
    mod = module_name(target.path)
    if function == "*":
        return f"{mod}.x*__mutmut_*"
    if "." in function:
        cls, meth = function.split(".")
        return f"{mod}.xǁ{cls}ǁ{meth}__mutmut_*"
    return f"{mod}.x_{function}__mutmut_*"


def function_nodes(path: Path) -> dict[str, ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every module-level function and method of `path`, by "func" and "Class.method"."""
    tree = ast.parse(path.read_text())
    out: dict[str, ast.FunctionDef | ast.AsyncFunctionDef] = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            out[node.name] = node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    out[f"{node.name}.{sub.name}"] = sub
    return out


def check_table(targets: tuple[Target, ...]) -> list[str]:
    """What in the table no longer matches the tree: a moved function, a missing test file."""
    problems = []
    for t in targets:
        path = ROOT / t.path
        if not path.exists():
            problems.append(f"{t.name}: {t.path} does not exist")
            continue
        found = function_nodes(path)
        problems += [f"{t.name}: {f} is not in {t.path}" for f in t.functions if f != "*" and f not in found]
        problems += [f"{t.name}: test {x} does not exist" for x in t.tests if not (ROOT / x.split("::")[0]).exists()]
    return problems


# -- running mutmut --------------------------------------------------------------------------------------------------


def toml_list(items: list[str]) -> str:
    return "[" + ", ".join('"' + i.replace("\\", "\\\\").replace('"', '\\"') + '"' for i in items) + "]"


# A mutant that makes a test hang (an upload whose future is never resolved) would hold a worker until mutmut's own
# timeout, 15 times the tests' measured time: minutes each. This pytest plugin, added to the scratch copy only, ends
# any test still running after HANG seconds with mutmut's "timeout" exit code (36), so a hang counts as detected
# within seconds. The healthy tests in TARGETS take under 5 s each even on a loaded machine.
HANG = 30.0
WATCHDOG = f'''"""Ends a test still running after {HANG:g} s with mutmut's timeout exit code (from tools/mutate.py)."""

import os
import threading

import pytest


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    timer = threading.Timer({HANG}, os._exit, args=(36,))
    timer.daemon = True
    timer.start()
    try:
        return (yield)
    finally:
        timer.cancel()
'''

# mypy as CI runs it, in the JSON form mutmut reads; a mutant it rejects could not land.
MYPY = [sys.executable, "-m", "mypy", "sidecar", "--output", "json", "--disable-error-code", "unused-ignore"]


def prepare(scratch: Path, targets: tuple[Target, ...]) -> None:
    """Copy the tree into `scratch` with a [tool.mutmut] section for `targets`."""
    ignore = shutil.ignore_patterns("__pycache__", ".pytest_cache", ".mypy_cache", ".hypothesis")
    for name in ("sidecar", "tests"):
        shutil.copytree(ROOT / name, scratch / name, ignore=ignore)
    tests = sorted({x for t in targets for x in t.tests})
    (scratch / "tests" / "mutation_watchdog.py").write_text(WATCHDOG)
    config = "\n".join([
        "", "[tool.mutmut]",
        'source_paths = ["sidecar/"]',
        f"only_mutate = {toml_list(sorted({t.path for t in targets}))}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        'pytest_add_cli_args = ["-p", "no:cacheprovider", "-p", "tests.mutation_watchdog", "-q"]',
        f"do_not_mutate_patterns = {toml_list(NOT_MUTATED)}",
        f"type_check_command = {toml_list(MYPY)}",
        "use_git_change_detection = false",
        "",
    ])
    (scratch / "pyproject.toml").write_text((ROOT / "pyproject.toml").read_text() + config)


def run_mutmut(scratch: Path, globs: list[str], jobs: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # Any subprocess a test starts imports the mutated tree too. The directory must exist before Python starts:
    # a missing sys.path entry is cached as such, and `tests` would then not import.
    (scratch / "mutants").mkdir(exist_ok=True)
    env["PYTHONPATH"] = str(scratch / "mutants")
    cmd = [sys.executable, "-m", "mutmut", "run", "--max-children", str(jobs), *globs]
    done = subprocess.run(cmd, cwd=scratch, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-4000:])
        raise SystemExit(f"mutate: mutmut run failed (exit {done.returncode}); output above")


def results(scratch: Path) -> dict[str, str]:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], cwd=scratch,
                         capture_output=True, text=True, check=True).stdout
    found = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep:
            found[name] = status
    return found


def show(scratch: Path, mutant: str) -> str:
    out = subprocess.run([sys.executable, "-m", "mutmut", "show", mutant], cwd=scratch, capture_output=True,
                         text=True, check=True).stdout
    return "\n".join(line for line in out.splitlines()[1:] if line.strip())


def changed_line(target: Target, mutant: str, diff: str) -> int:
    """The line of `target.path` that the mutant changes: the diff's line within the function, mapped back."""
    func = mutant.rsplit(".", 1)[1].split("__mutmut_")[0]
    key = func.removeprefix("x_") if func.startswith("x_") else ".".join(func.split("ǁ")[1:3])
    node = function_nodes(ROOT / target.path)[key]
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    offset = 0
    for line in diff.splitlines():
        if m := re.match(r"@@ -(\d+)", line):
            offset = int(m.group(1)) - 1
        elif line.startswith("-") and not line.startswith("---"):
            return start + offset
        elif line.startswith(" "):
            offset += 1
    return start


# -- report ----------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="TARGET", help="targets to run, by name (default: all)")
    parser.add_argument("--list", action="store_true", help="print the table, check it against the tree, and stop")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once (default 2)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory (for `mutmut browse`)")
    args = parser.parse_args(argv)

    targets = TARGETS
    if args.only:
        unknown = set(args.only) - {t.name for t in TARGETS}
        if unknown:
            parser.error(f"unknown target(s) {sorted(unknown)}; known: {[t.name for t in TARGETS]}")
        targets = tuple(t for t in TARGETS if t.name in args.only)
    problems = check_table(targets)
    if args.list:
        for t in targets:
            print(f"{t.name:18} {t.path:28} {', '.join(t.functions)}\n{'':18} tests: {', '.join(t.tests)}")
    if problems:
        print("\n".join(f"mutate: {p}; update TARGETS in tools/mutate.py" for p in problems), file=sys.stderr)
        return 2
    if args.list:
        return 0

    if importlib.util.find_spec("mutmut") is None:
        print("mutate: mutmut is not installed: pip install -e '.[mutation]'", file=sys.stderr)
        return 2
    scratch = Path(tempfile.mkdtemp(prefix="sidecar-mutate-"))
    t0 = time.monotonic()
    try:
        prepare(scratch, targets)
        globs = {t.name: [mutant_glob(t, f) for f in t.functions] for t in targets}
        run_mutmut(scratch, [g for gs in globs.values() for g in gs], args.jobs)
        statuses = results(scratch)
        minutes = (time.monotonic() - t0) / 60
        report(scratch, targets, globs, statuses, minutes, args)
    finally:
        if args.keep:
            print(f"\nscratch kept: {scratch} (cd there and run `python -m mutmut browse`)")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(scratch: Path, targets: tuple[Target, ...], globs: dict[str, list[str]], statuses: dict[str, str],
           minutes: float, args: argparse.Namespace) -> None:
    by_target: dict[str, dict[str, str]] = {}
    for t in targets:
        by_target[t.name] = {m: s for m, s in statuses.items() if any(fnmatch.fnmatchcase(m, g) for g in globs[t.name])}
    total = Counter[str]()
    print(f"{'target':18} {'mutants':>7} {'killed':>7} {'timeout':>7} {'mypy':>5} {'left':>5} {'score':>7}"
          f" {'tests only':>10}")
    for t in targets:
        counts = Counter(s for s in by_target[t.name].values() if s != "skipped")
        total.update(counts)
        print(line(t.name, counts))
    print(line("ALL", total))
    command = "python tools/mutate.py" + (f" --only {' '.join(args.only)}" if args.only else "")
    print(f"\n{command}: {minutes:.1f} min, {args.jobs} jobs")
    for t in targets:
        left = sorted((m for m, s in by_target[t.name].items() if s in UNDETECTED), key=mutant_order)
        if not left:
            continue
        print(f"\n== {t.name}: {len(left)} surviving")
        for m in left:
            diff = show(scratch, m)
            print(f"\n{t.path}:{changed_line(t, m, diff)}  {m.rsplit('.', 1)[1]}  ({by_target[t.name][m]})")
            print("\n".join(x for x in diff.splitlines() if x[:1] in "+-" and x[:3] not in ("+++", "---")))


def mutant_order(name: str) -> tuple[str, int]:
    base, _, n = name.rpartition("__mutmut_")
    return base, int(n)


def line(name: str, c: Counter[str]) -> str:
    n = sum(c.values())
    detected = sum(c[s] for s in DETECTED)
    left = sum(c[s] for s in UNDETECTED)
    typed = c["caught by type check"]
    score = f"{100 * detected / n:6.1f}%" if n else "-"
    # Without mypy's share: of the mutants that type-check, how many the tests catch.
    tests_only = f"{100 * (detected - typed) / (n - typed):6.1f}%" if n > typed else "-"
    return f"{name:18} {n:7} {c['killed']:7} {c['timeout']:7} {typed:5} {left:5} {score:>7} {tests_only:>10}"


if __name__ == "__main__":
    raise SystemExit(main())
