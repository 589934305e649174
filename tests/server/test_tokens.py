"""Tokens: the `<cluster> <token>` lines the server reads, and the cluster a presented token grants."""

from __future__ import annotations

import pytest

from sidecar.errors import SidecarError
from sidecar.server import Scope, parse_tokens
from sidecar.server.auth import Tokens

A = "tok-a-0123456789abcdef"
B = "tok-b-0123456789abcdef"
SIXTEEN = "s" * 16
ADMIN = "tok-admin-0123456789abcdef"


class TestParseTokens:
    """parse_tokens(text, source) -> {token: cluster}; every bad line is refused, naming the source and line."""

    @pytest.mark.parametrize(("text", "want"), [
        ("", {}),
        (f"alpha {A}\nbeta {B}\n", {A: "alpha", B: "beta"}),
        (f"alpha {A};beta {B}", {A: "alpha", B: "beta"}),
        (f"# the tokens\n\n  alpha   {A}  # alpha's # second comment\n\t\nbeta {B}", {A: "alpha", B: "beta"}),
        (f"short {SIXTEEN}", {SIXTEEN: "short"}),
        (f"alpha {A}\nalpha {B}", {A: "alpha", B: "alpha"}),
        (f"alpha {A}\nalpha {A}", {A: "alpha"}),
    ], ids=["empty", "lines", "semicolons", "comments and blanks", "sixteen characters", "two tokens, one cluster",
            "a line given twice"])
    def test_good(self, text: str, want: dict[str, str]) -> None:
        """Valid text gives exactly these tokens."""
        assert parse_tokens(text, "tokens.txt") == {t: Scope(c) for t, c in want.items()}

    def test_read_only_column(self) -> None:
        """A third column `read` makes a token read-only; nothing else may stand there."""
        assert parse_tokens(f"alpha {A} read\nbeta {B}", "t") == {A: Scope("alpha", True), B: Scope("beta")}
        with pytest.raises(SidecarError, match="line 1: want '<cluster> <token>' or '<cluster> <token> read'"):
            parse_tokens(f"alpha {A} write", "t")

    @pytest.mark.parametrize(("text", "error"), [
        (f"alpha {A}\nbeta", r"^tokens\.txt: line 2: want '<cluster> <token>' or '<cluster> <token> read'$"),
        (f"alpha {A} extra", r"^tokens\.txt: line 1: want '<cluster> <token>' or '<cluster> <token> read'$"),
        (f"alpha {A};\n;beta", r"^tokens\.txt: line 4: want '<cluster> <token>' or '<cluster> <token> read'$"),
        (f"# c\nalpha {SIXTEEN[:-1]}",
         r"^tokens\.txt: line 2: token for cluster 'alpha' is shorter than 16 characters$"),
        (f"alpha {A}\nbeta {A}", r"^tokens\.txt: line 2: token for cluster 'beta' is already line 1's, for cluster "
                                 r"'alpha'$"),
        (f"alpha {A} read;alpha {A}", r"^tokens\.txt: line 2: token for cluster 'alpha' is already line 1's, for "
                                      r"cluster 'alpha' \(read\)$"),
    ], ids=["one field", "three fields", "counted after ;", "fifteen characters", "one token, two clusters",
            "one token, read and write"])
    def test_bad(self, text: str, error: str) -> None:
        """A malformed line is refused with its source and line number."""
        with pytest.raises(SidecarError, match=error):
            parse_tokens(text, "tokens.txt")

    def test_bad_cluster_name(self) -> None:
        """A cluster name that could escape its directory is refused."""
        with pytest.raises(SidecarError, match=r"line 2: cluster: invalid database name '\.\.'"):
            parse_tokens(f"alpha {A}\n.. {B}", "tokens.txt")


class TestTokenScope:
    """Tokens.scope(token): the cluster granted, "*" for the admin token, None for anything else."""

    @pytest.mark.parametrize(("admin", "token", "want"), [
        (ADMIN, A, "alpha"),
        (ADMIN, B, "beta"),
        (ADMIN, ADMIN, "*"),
        (ADMIN, "", None),
        (ADMIN, A + "x", None),
        (ADMIN, A[:-1], None),
        (ADMIN, "tok-c-0123456789abcdef", None),
        ("", "", None),
        ("", ADMIN, None),
        (A, A, "*"),  # a token that is also the admin token grants everything
    ], ids=["alpha", "beta", "admin", "empty", "longer", "shorter", "unknown", "no admin, empty", "no admin",
            "admin wins"])
    def test_token_scope(self, admin: str, token: str, want: str | None) -> None:
        """Each presented token maps to exactly one scope."""
        tokens = Tokens({A: Scope("alpha"), B: Scope("beta")}, admin)
        found = tokens.scope(token)
        assert (found.cluster if found else None) == want

    @pytest.mark.parametrize(("header", "token"), [(A, A), (f"FlyV1 {A}", A), (f"Bearer {A}", A), (f" {A} ", A),
                                                   (f"Basic {A}", f"Basic {A}")])
    def test_authorization_header(self, header: str, token: str) -> None:
        """The token in an Authorization header: as is, after FlyV1 or Bearer, trimmed; other schemes untouched."""
        assert Tokens.from_header(header) == token
