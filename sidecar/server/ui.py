"""The dashboard at /ui: static pages (package data, no build step) over the operator API, behind a session.

Signing in exchanges a token (the admin token, or a cluster token, which then sees only its cluster) for a
session: a random id in an HttpOnly, SameSite=Strict cookie, kept in memory (a restart signs everyone out). The
pages then call the operator API (/api/...) with that cookie. Anything that changes data (POST, PUT, DELETE)
must also carry the session's CSRF token in `X-CSRF-Token`, which only a page of this origin can read (from
GET /ui/session); without it the request gets 403 ECSRF and changes nothing.

    GET  /ui/                 the single page (login, overview, database)
    POST /ui/login            {"token"} -> sets the cookie, returns {"scope", "csrf"}
    GET  /ui/session          {"scope", "csrf"} of the current session, or 401
    POST /ui/logout           ends the session (CSRF required)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from aiohttp import web

from sidecar.server.auth import Scope
from sidecar.server.http import error
from sidecar.server.metrics import Metrics

STATIC = Path(__file__).with_name("ui")
COOKIE = "litefs_sidecar_session"
SESSION_TTL = 12 * 3600.0
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})


@dataclass
class Session:
    scope: Scope
    csrf: str
    expires: float


class SessionStore(Protocol):
    """Where sessions live: `issue` returns the cookie's value, `read` the session it names (None if none or
    expired), `revoke` ends it."""

    def issue(self, session: Session) -> str: ...

    def read(self, cookie: str) -> Session | None: ...

    def revoke(self, cookie: str) -> None: ...


class MemorySessions:
    """Sessions in this process's memory: a random id in the cookie (one process; a restart signs everyone out)."""

    def __init__(self) -> None:
        self._sessions: dict[str, Session] = {}

    def issue(self, session: Session) -> str:
        now = time.time()
        self._sessions = {k: s for k, s in self._sessions.items() if s.expires > now}
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = session
        return sid

    def read(self, cookie: str) -> Session | None:
        found = self._sessions.get(cookie)
        if found is not None and found.expires < time.time():
            del self._sessions[cookie]
            return None
        return found

    def revoke(self, cookie: str) -> None:
        self._sessions.pop(cookie, None)


class SignedSessions:
    """The session itself in the cookie, signed (HMAC-SHA256) with a key every server process with the same
    tokens derives alike: any process, after any restart, reads it. Signing out forgets it in this process and
    clears the browser's cookie; a copy of the cookie stays valid elsewhere until it expires (12 h)."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        self._revoked: dict[str, float] = {}

    @classmethod
    def from_secrets(cls, secrets_: list[str]) -> SignedSessions:
        material = "\n".join(["litefs-sidecar dashboard sessions", *sorted(secrets_)]).encode()
        return cls(hashlib.sha256(material).digest())

    def _sign(self, body: bytes) -> str:
        return base64.urlsafe_b64encode(hmac.new(self._key, body, hashlib.sha256).digest()).decode().rstrip("=")

    def issue(self, session: Session) -> str:
        doc = {"c": session.scope.cluster, "r": session.scope.readonly, "x": session.csrf, "e": session.expires}
        body = base64.urlsafe_b64encode(json.dumps(doc, separators=(",", ":")).encode()).decode().rstrip("=")
        return f"{body}.{self._sign(body.encode())}"

    def read(self, cookie: str) -> Session | None:
        body, _, sig = cookie.partition(".")
        if not body or not hmac.compare_digest(sig.encode(), self._sign(body.encode()).encode()):
            return None
        if cookie in self._revoked:
            return None
        try:
            doc = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
            session = Session(Scope(str(doc["c"]), bool(doc["r"])), str(doc["x"]), float(doc["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        return session if session.expires >= time.time() else None

    def revoke(self, cookie: str) -> None:
        now = time.time()
        self._revoked = {k: e for k, e in self._revoked.items() if e > now}
        found = self.read(cookie)
        if found is not None:
            self._revoked[cookie] = found.expires


class SessionError(Exception):
    """A cookie-authenticated request that must be refused: (status, code, message)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code


class Dashboard:
    """The dashboard's routes and its sessions; `sign_in` maps a presented token to its scope (or None)."""

    def __init__(self, sign_in: Callable[[str], Scope | None], metrics: Metrics,
                 sessions: SessionStore | None = None) -> None:
        self.sign_in = sign_in
        self.metrics = metrics
        self.sessions = sessions or MemorySessions()

    def add_routes(self, app: web.Application) -> None:
        r = app.router
        r.add_get("/ui", self.redirect)
        r.add_get("/ui/", self.index)
        r.add_post("/ui/login", self.login)
        r.add_post("/ui/logout", self.logout)
        r.add_get("/ui/session", self.session)
        r.add_static("/ui/static", STATIC, append_version=False)

    # -- sessions -------------------------------------------------------------------------------------

    def _current(self, request: web.Request) -> tuple[str, Session] | None:
        cookie = request.cookies.get(COOKIE, "")
        found = self.sessions.read(cookie) if cookie else None
        return (cookie, found) if found is not None else None

    def scope(self, request: web.Request) -> Scope | None:
        """The scope of a cookie-authenticated API request, None if there is no session; SessionError if it
        must be refused."""
        current = self._current(request)
        if current is None:
            return None
        if request.method in UNSAFE:
            sent = request.headers.get("X-CSRF-Token", "")
            if not sent or not hmac.compare_digest(sent.encode(), current[1].csrf.encode()):
                raise SessionError(403, "ECSRF", f"{request.method} {request.path}: missing or wrong X-CSRF-Token")
        return current[1].scope

    # -- handlers -------------------------------------------------------------------------------------

    async def redirect(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/ui/")

    async def index(self, request: web.Request) -> web.FileResponse:
        resp = web.FileResponse(STATIC / "index.html")
        resp.headers["Cache-Control"] = "no-store"
        resp.headers["Content-Security-Policy"] = "default-src 'self'; frame-ancestors 'none'"
        resp.headers["X-Frame-Options"] = "DENY"
        return resp

    async def login(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError:
            body = None
        token = body.get("token", "") if isinstance(body, dict) else ""
        if not isinstance(token, str):
            token = ""
        scope = self.sign_in(token)
        if scope is None:
            self.metrics.rejections.labels("EINVALIDAUTH").inc()
            return error(401, "EINVALIDAUTH", "invalid token: use the admin token or a cluster token")
        csrf = secrets.token_urlsafe(32)
        sid = self.sessions.issue(Session(scope, csrf, time.time() + SESSION_TTL))
        resp = web.json_response({"scope": scope.cluster, "readonly": scope.readonly, "csrf": csrf})
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/", max_age=int(SESSION_TTL),
                        secure=request.secure)
        return resp

    async def session(self, request: web.Request) -> web.Response:
        current = self._current(request)
        if current is None:
            return error(401, "EINVALIDAUTH", "not signed in")
        scope = current[1].scope
        return web.json_response({"scope": scope.cluster, "readonly": scope.readonly, "csrf": current[1].csrf})

    async def logout(self, request: web.Request) -> web.Response:
        try:
            if self.scope(request) is None:
                return error(401, "EINVALIDAUTH", "not signed in")
        except SessionError as err:
            return error(err.status, err.code, str(err))
        current = self._current(request)
        if current is not None:
            self.sessions.revoke(current[0])
        resp = web.json_response({"signedOut": True})
        resp.del_cookie(COOKIE, path="/")
        return resp
