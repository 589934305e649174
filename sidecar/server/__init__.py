"""The backup server: the LiteFS Cloud protocol and the operator API over HTTP."""

from sidecar.server.app import Server, ServerConfig, parse_tokens, serve

__all__ = ["Server", "ServerConfig", "parse_tokens", "serve"]
