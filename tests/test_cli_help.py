"""`litefs-sidecar --help` and every subcommand's help show examples a user can copy."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.cli import build_parser, main


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


def test_examples_are_never_wrapped_and_every_command_says_what_it_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """At 80 columns each example line of every help text is shown whole (a URL is never cut), and each command
    has a description line."""
    monkeypatch.setenv("COLUMNS", "80")
    for path, parser in commands(build_parser()):
        name = f"`litefs-sidecar {' '.join(path)} --help`"
        assert parser.description, f"{name} has no description line"
        shown = parser.format_help().splitlines()
        examples = [line for line in (parser.epilog or "").splitlines() if "litefs-sidecar " in line]
        assert examples, name
        for line in examples:
            assert line in shown, f"{name} wraps {line.strip()!r}"


class TestExitStatus:
    """One convention for every command: 2 for bad usage or input, 1 for a failure; `--help` says so."""

    def test_the_top_level_help_states_it(self) -> None:
        text = build_parser().format_help()
        assert "1    failed" in text and "2    bad usage or input" in text

    @pytest.mark.parametrize("target", [["--txid", "zz"], ["--txid", "0"], ["--timestamp", "yesterday"]])
    @pytest.mark.parametrize("command", [["restore", "-o", "out.db", "file:///nowhere/default/app.db"],
                                         ["admin", "restore", "--db", "app.db", "--server", "http://127.0.0.1:9"]])
    def test_a_malformed_target_is_bad_input(self, command: list[str], target: list[str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
        """`restore` and `admin restore` alike: exit 2, argparse naming the flag, nothing attempted."""
        with pytest.raises(SystemExit) as info:
            main([*command, *target])
        assert info.value.code == 2
        assert f"argument {target[0]}: {target[1]!r}: want " in capsys.readouterr().err

    def test_timestamps_in_every_documented_form(self) -> None:
        """RFC 3339 with Z or an offset; no zone means UTC; a space for the T; seconds left out."""
        parser = build_parser()
        for text in ("2026-11-24T09:00:00Z", "2026-11-24T11:00:00+02:00", "2026-11-24T09:00:00",
                     "2026-11-24 09:00:00", "2026-11-24 09:00"):
            args = parser.parse_args(["restore", "--timestamp", text, "-o", "x.db", "file:///b/default/app.db"])
            assert args.timestamp == 1795510800000, text
        help_text = " ".join(" ".join(p.format_help().split()) for _, p in commands(parser))
        assert "without one it is UTC" in help_text and "a space may stand for the T" in help_text

    def test_a_failed_restore_is_a_failure(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A well-formed request that cannot be met (no backup there) exits 1 with one line."""
        assert main(["restore", "--txid", "5", "-o", str(tmp_path / "out.db"), f"file://{tmp_path}/none/app.db"]) == 1
        assert capsys.readouterr().err.startswith("litefs-sidecar: ")
