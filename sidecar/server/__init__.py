"""The backup server: the LiteFS Cloud protocol, the operator API and the dashboard over HTTP."""

from sidecar.server.app import Server, ServerConfig, serve
from sidecar.server.auth import Scope, parse_tokens, token_sources

__all__ = ["Scope", "Server", "ServerConfig", "parse_tokens", "serve", "token_sources"]
