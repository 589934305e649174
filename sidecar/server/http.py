"""What every route of the server shares: request keys, JSON errors, the database parameter, body reading.

Every refusal is a JSON `{code, error}` (sidecar.protocol) with a 4xx for the client's mistakes and a 5xx only
for ours or the store's. A handler raises `ClientError` (or a `SidecarError`, which carries its own code and
status); the error middleware in app.py turns it into the answer.
"""

from __future__ import annotations

import asyncio

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


async def read_body(request: web.Request, limit: int, seconds: float, *, read: int = 0) -> bytes:
    """The rest of the request body, received within `seconds`; `limit` bytes at most in all, the `read` bytes the
    caller already took included (a 413 names the limit the client is held to)."""
    if request.content.total_bytes == 0:
        check_length(request, limit)
    buf = bytearray()
    try:
        async with asyncio.timeout(seconds):  # a slow or stalled sender holds nothing
            async for chunk in request.content.iter_chunked(1 << 20):
                buf += chunk
                if read + len(buf) > limit:
                    raise ClientError(413, "ETOOLARGE", f"request body exceeds {limit} bytes")
    except TimeoutError:
        raise ClientError(408, "ETIMEOUT", f"request body not received within {seconds:g}s") from None
    except (RequestPayloadError, HttpProcessingError) as err:
        encoding = request.headers.get("Content-Encoding", "")
        raise ClientError(400, "EBADBODY", f"request body unreadable{' as ' + encoding if encoding else ''}: "
                          f"{err.__cause__ or err}") from None
    except OSError as err:
        raise _gone(err) from None
    return bytes(buf)


def _gone(err: OSError) -> ClientError:
    """The client closed the connection before its body was in (aiohttp's "Connection lost"): the client's doing,
    answered (to no one) as an unreadable body, not an error of the server's."""
    return ClientError(400, "EBADBODY", f"request body unreadable: the client went away ({err})")


__all__ = ["ADMIN", "CLUSTER", "READONLY", "ClientError", "db_param", "error", "read_body", "read_head"]
