"""`litefs-sidecar --help` and every subcommand's help show examples a user can copy."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from sidecar.cli import build_parser


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[
        tuple[tuple[str, ...], argparse.ArgumentParser]]:
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))


def test_every_command_shows_an_example_of_itself() -> None:
    found = list(commands(build_parser()))
    assert len(found) > 20  # the top level, each command, each ltx and admin subcommand
    for path, parser in found:
        text = parser.format_help()
        assert "example" in text, f"`litefs-sidecar {' '.join(path)} --help` shows no example"
        assert f"litefs-sidecar {' '.join(path)}".strip() in text, f"{path}: no example of this command"


def test_short_spellings_reach_the_same_settings(tmp_path: Path) -> None:
    """`run --mount` is `--mount-dir`, `serve --tokens` is `--tokens-file`: both spellings appear in docs."""
    from sidecar.commands import run

    parser = build_parser()
    args = parser.parse_args(["run", "--data-dir", str(tmp_path), "--mount", "/m", "--upstream", "file:///b"])
    config = run.load(args)
    assert str(config.sidecar.mount_dir) == "/m" and config.source("sidecar.mount_dir") == "flag --mount-dir"
    args = parser.parse_args(["serve", "--tokens", str(tmp_path / "tokens")])
    assert vars(args)["server.tokens_file"] == str(tmp_path / "tokens")
