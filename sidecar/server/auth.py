"""Who may do what: per-cluster tokens, the admin token, and read-only tokens.

The tokens file has one `<cluster> <token> [read]` per line (or `;`-separated), `#` comments. A token reaches
only its cluster; `read` makes it read-only (it can never write: uploads, restores, uploads of databases,
clones and deletions answer 403). The admin token reaches every cluster. A presented token is looked up by its
HMAC under a key drawn at start: the lookup compares digests an attacker cannot steer, so its timing says nothing
about which tokens exist, and it costs the same for ten tokens as for ten thousand.
"""

from __future__ import annotations

import hmac
import secrets
from dataclasses import dataclass
from pathlib import Path

from sidecar.errors import SidecarError, validate_cluster_name

ADMIN_SCOPE = "*"
MIN_TOKEN = 16


@dataclass(frozen=True, slots=True)
class Scope:
    """What a token grants: one cluster (or every cluster, "*"), read-only or not."""

    cluster: str
    readonly: bool = False

    @property
    def admin(self) -> bool:
        return self.cluster == ADMIN_SCOPE


def parse_tokens(text: str, source: str) -> dict[str, Scope]:
    """Parse a tokens file; returns token -> scope. Raises SidecarError naming the source and line."""
    out: dict[str, Scope] = {}
    lines: dict[str, int] = {}
    for n, raw in enumerate(text.replace(";", "\n").splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) not in (2, 3) or parts[2:] not in ([], ["read"]):
            raise SidecarError(f"{source}: line {n}: want '<cluster> <token>' or '<cluster> <token> read'")
        cluster, token = parts[0], parts[1]
        try:
            validate_cluster_name(cluster)
        except SidecarError as err:
            raise SidecarError(f"{source}: line {n}: cluster: {err}") from None
        if len(token) < MIN_TOKEN:
            raise SidecarError(f"{source}: line {n}: token for cluster {cluster!r} is shorter than {MIN_TOKEN} "
                               "characters")
        scope = Scope(cluster, readonly=len(parts) == 3)
        if out.get(token, scope) != scope:  # one would silently win: a node of one cluster writing another's
            raise SidecarError(f"{source}: line {n}: token for cluster {cluster!r} is already line {lines[token]}'s, "
                               f"for cluster {out[token].cluster!r}{' (read)' if out[token].readonly else ''}")
        out[token], lines[token] = scope, n
    return out


def token_sources(tokens_file: str, tokens_env: str) -> dict[str, Scope]:
    """Tokens from a file and from its environment twin's text."""
    tokens: dict[str, Scope] = {}
    if tokens_file:
        tokens.update(parse_tokens(Path(tokens_file).read_text(), tokens_file))
    if tokens_env:
        tokens.update(parse_tokens(tokens_env, "LITEFS_SIDECAR_SERVER_TOKENS"))
    return tokens


class Tokens:
    """Looks up the scope a presented token grants."""

    def __init__(self, tokens: dict[str, Scope], admin_token: str = "") -> None:
        self._key = secrets.token_bytes(32)
        self.clusters = sorted({s.cluster for s in tokens.values()})
        self._scopes = {self._digest(t): s for t, s in tokens.items()}
        if admin_token:
            self._scopes[self._digest(admin_token)] = Scope(ADMIN_SCOPE)  # the admin token wins over a cluster's

    def _digest(self, token: str) -> bytes:
        return hmac.digest(self._key, token.encode(), "sha256")

    def scope(self, token: str) -> Scope | None:
        """The scope `token` grants, or None."""
        return self._scopes.get(self._digest(token)) if token else None

    @staticmethod
    def from_header(header: str) -> str:
        """The token in an Authorization header: as is, `FlyV1 <token>` or `Bearer <token>`."""
        for scheme in ("FlyV1 ", "Bearer "):
            if header.startswith(scheme):
                return header[len(scheme):].strip()
        return header.strip()


__all__ = ["ADMIN_SCOPE", "Scope", "Tokens", "parse_tokens", "token_sources"]
