"""What README.md says about the command line is true of the command line."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sidecar import config as cfgmod
from sidecar.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def subparser(*path: str) -> argparse.ArgumentParser:
    parser = build_parser()
    for name in path:
        [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        parser = action.choices[name]
    return parser


def test_each_environment_twin_names_the_flags_setting() -> None:
    """"`LITEFS_SIDECAR_X` is the environment twin of `--flag`": the variable and the flag set the same setting."""
    claims = re.findall(r"`(LITEFS_SIDECAR_\w+)` is the environment twin of\s+`(--[\w-]+)`", README)
    assert claims, "the README names environment twins"
    flags = {flag: action.dest for command in ("run", "serve") for action in subparser(command)._actions
             for flag in action.option_strings}
    env = {cfgmod.env_name(s, f.name): f"{s}.{f.name}" for s in cfgmod.SECTIONS for f in cfgmod.section_fields(s)}
    for variable, flag in claims:
        assert variable in env, f"{variable} is no setting's variable"
        assert flags.get(flag) == env[variable], f"{variable} sets {env[variable]}, but {flag} sets {flags.get(flag)}"
