"""What every route of the server shares: request keys, JSON errors, the database parameter, body reading.

Every refusal is a JSON `{code, error}` (sidecar.protocol) with a 4xx for the client's mistakes and a 5xx only
for ours or the store's. A handler raises `ClientError` (or a `SidecarError`, which carries its own code and
status); the error middleware in app.py turns it into the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import Callable, Iterator

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from sidecar.errors import SidecarError, validate_db_name
from sidecar.ltx import Pos
from sidecar.protocol import error_json

CLUSTER = web.RequestKey("cluster", str)  # the caller's cluster ("*" for the admin token without ?cluster=)
ADMIN = web.RequestKey("admin", bool)  # the caller holds the admin token
READONLY = web.RequestKey("readonly", bool)  # the caller holds a read-only token


class ClientError(SidecarError):
    """A request the client got wrong: answered with `status` and `code`, naming the field."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.http_status = status
        self.code = code


class Busy(SidecarError):
    """The caller's cluster already has as many upload bytes in flight as it may: 503, retry shortly."""

    code = "EBUSY"
    http_status = 503
    retry_after = 1


class Quota:
    """At most `limit` of something (`unit`: bytes of uploads in flight, snapshot downloads under way) held at once
    per cluster, whatever the route: one cluster's clients cannot take the server's memory or disk, nor another
    cluster's share. Past it, 503 Busy."""

    def __init__(self, limit: int, unit: str) -> None:
        self.limit = limit
        self.unit = unit
        self.held: Counter[str] = Counter()

    @contextlib.contextmanager
    def hold(self, cluster: str, what: str, first: int = 0) -> Iterator[Callable[[int], None]]:
        """A `take(n)` that counts n more units of one request (`what` names it; `first` taken at once) against its
        cluster, raising Busy past the limit; everything taken is given back on exit."""
        taken = 0

        def take(n: int) -> None:
            nonlocal taken
            if self.held[cluster] + n > self.limit:
                raise Busy(f"{what}: cluster {cluster!r} already has {self.held[cluster]} {self.unit} "
                           f"(limit {self.limit}); retry shortly")
            self.held[cluster] += n
            taken += n
        try:
            if first:
                take(first)
            yield take
        finally:
            self.held[cluster] -= taken
            if self.held[cluster] <= 0:
                del self.held[cluster]


def error(status: int, code: str, message: str, pos: Pos | None = None,
          headers: dict[str, str] | None = None) -> web.Response:
    """A JSON error answer."""
    return web.json_response(error_json(code, message, pos), status=status, headers=headers)


def db_param(request: web.Request) -> tuple[str, str]:
    """(cluster, db) named by the request; the admin token must say which cluster."""
    name = request.query.get("db", "")
    if not name:
        raise ClientError(400, "EBADDB", "missing ?db=<database name>")
    validate_db_name(name)
    cluster = request[CLUSTER]
    if cluster == "*":
        raise ClientError(400, "ENOCLUSTER", "the admin token needs ?cluster=<cluster> on this route")
    return cluster, name


async def read_head(request: web.Request, n: int, seconds: float) -> bytes:
    """The body's first `n` bytes (fewer if the body is shorter), received within `seconds`.

    Not capped at the Content-Length: for a body with a Content-Encoding that is the compressed size, and aiohttp
    hands us the decompressed bytes; a shorter body simply ends the read early."""
    if request.content_length == 0:
        return b""
    try:
        if request.content.is_eof():  # all of it is here (a small upload comes with its headers): no timer to set
            return request.content.read_nowait(n)
        async with asyncio.timeout(seconds):
            return await request.content.readexactly(n)
    except asyncio.IncompleteReadError as err:
        return err.partial
    except TimeoutError:
        raise ClientError(408, "ETIMEOUT", f"request body not received within {seconds:g}s") from None
    except (RequestPayloadError, HttpProcessingError) as err:
        raise ClientError(400, "EBADBODY", f"request body unreadable: {err.__cause__ or err}") from None
    except OSError as err:
        raise _gone(err) from None


def check_length(request: web.Request, limit: int) -> None:
    """413 before anything is read when the declared length already exceeds `limit`."""
    if request.content_length is not None and request.content_length > limit:
        raise ClientError(413, "ETOOLARGE", f"request body of {request.content_length} bytes exceeds {limit}")


async def read_body(request: web.Request, limit: int, seconds: float, take: Callable[[int], None] | None = None, *,
                    read: int = 0) -> bytes:
    """The rest of the request body, received within `seconds`; `limit` bytes at most in all, the `read` bytes the
    caller already took included (a 413 names the limit the client is held to); `take` (Quota.hold) counts
    each chunk as it arrives."""
    if request.content.total_bytes == 0:
        check_length(request, limit)
    buf = bytearray()

    def add(chunk: bytes) -> None:
        if read + len(buf) + len(chunk) > limit:  # too big whatever else is in flight: 413, not 503
            raise ClientError(413, "ETOOLARGE", f"request body exceeds {limit} bytes")
        if take is not None:
            take(len(chunk))
        buf.extend(chunk)
    try:
        if request.content.is_eof():  # all of it is here already (the usual small upload): no timer to set; the
            add(request.content.read_nowait(-1))  # two timers of an upload took 6% of the server's Python time
            return bytes(buf)
        async with asyncio.timeout(seconds):  # a slow or stalled sender holds nothing
            async for chunk in request.content.iter_chunked(1 << 20):
                add(chunk)
    except TimeoutError:
        raise ClientError(408, "ETIMEOUT", f"request body not received within {seconds:g}s") from None
    except (RequestPayloadError, HttpProcessingError) as err:
        encoding = request.headers.get("Content-Encoding", "")
        raise ClientError(400, "EBADBODY", f"request body unreadable{' as ' + encoding if encoding else ''}: "
                          f"{err.__cause__ or err}") from None
    except OSError as err:
        raise _gone(err) from None
    return bytes(buf)


async def send(request: web.Request, resp: web.StreamResponse, data: bytes, seconds: float) -> None:
    """Write `data`, which the client must take within `seconds`: one that stopped reading a download holds its
    connection (and whatever the download holds, a snapshot's temporary file) no longer than that."""
    try:
        async with asyncio.timeout(seconds):
            await resp.write(data)
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()
        raise ConnectionResetError(f"the client took no data for {seconds:g}s") from None


def _gone(err: OSError) -> ClientError:
    """The client closed the connection before its body was in (aiohttp's "Connection lost"): the client's doing,
    answered (to no one) as an unreadable body, not an error of the server's."""
    return ClientError(400, "EBADBODY", f"request body unreadable: the client went away ({err})")


__all__ = ["ADMIN", "CLUSTER", "READONLY", "Busy", "ClientError", "Quota", "db_param", "error",
           "read_body", "read_head", "send"]
