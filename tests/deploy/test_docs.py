"""Every `litefs-sidecar …` command shown in the deploy READMEs and the operator docs parses with the live CLI."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pytest

from sidecar.cli import build_parser
from tests.deploy.deployfiles import DEPLOY, REPO, commands_in_shell, shell_blocks

DOCS = [*sorted(DEPLOY.glob("**/README.md")),
        *(REPO / "docs" / name for name in ("architecture.md", "runbook.md", "cost-model.md", "serverless.md"))]


class TestDocumentedCommands:
    """The commands a user copies from the docs."""

    @pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
    def test_every_command_parses(self, path: Path) -> None:
        commands = commands_in_shell(shell_blocks(path.read_text()))
        for argv in commands:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    args = build_parser().parse_args(argv)
            except SystemExit as exc:
                raise AssertionError(f"{path.name}: `litefs-sidecar {' '.join(argv)}`: {err.getvalue()}") from exc
            assert callable(getattr(args, "func", None)), f"{path.name}: `litefs-sidecar {' '.join(argv)}`"

    def test_serverless_shows_query_replicate_and_a_read_token(self) -> None:
        text = (REPO / "docs" / "serverless.md").read_text()
        used = {argv[0] for argv in commands_in_shell(shell_blocks(text))}
        assert {"query", "replicate", "serve"} <= used
        assert "default 9b27…44 read" in text and (REPO / "docs" / "examples" / "serverless_app.py").exists()

    def test_the_runbook_shows_the_restore_commands(self) -> None:
        commands = commands_in_shell(shell_blocks((REPO / "docs" / "runbook.md").read_text()))
        used = {tuple(argv[:2]) if argv[0] == "admin" else (argv[0],) for argv in commands}
        assert {("restore",), ("ls",), ("verify",), ("admin", "restore"), ("admin", "show")} <= used
