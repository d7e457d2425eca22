"""Who may use the local API: its own apps on this machine, nobody else (issue 9, defect 3).

A web page open in the laptop's browser can reach 127.0.0.1 too: a form posts `text/plain` to
any address without a CORS preflight, and DNS rebinding (evil.example resolving to 127.0.0.1)
lets a script read the answers. So every request passes four checks, in this order:

1. Host: the Host header names a loopback address (127.0.0.0/8, ::1, localhost, with or without a
   port): a rebinding page sends its own name. Skipped with `allow_remote = true`, where the API
   is meant to be reached by name and TLS plus the token do the work.
2. Origin: when a browser says where the request comes from, it must be the agent's own address
   (same scheme, a loopback host, the port the request arrived on). Any other page is refused.
3. Token: `Authorization: Bearer <token>`, compared in constant time. The token is made by `init`
   (or by the first `run` of an agent set up before tokens existed) and kept in
   `<data_dir>/api-token`, mode 0600; apps read that file or `$FIELDSYNC_API_TOKEN`. A page cannot
   send the header without a preflight, which this API never answers.
4. Content type: PUT, POST, PATCH and DELETE declare `application/json` or
   `application/x-ndjson`, the types a form cannot send (defence in depth behind the token).

Refusals are JSON like every other error ({"error", "message"}), 403 for Host and Origin, 401
(with `WWW-Authenticate: Bearer`) for the token, 415 for the content type. The token itself is
never logged or echoed; the file it lives in is named.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from agent.config import TOKEN_FILENAME, is_loopback_host
from protocol.files import atomic_write, check_private_file

log = logging.getLogger("fieldsync.agent.api")

TOKEN_PREFIX = "fsl_"  # recognisable in a leaked log or a secret scanner
TOKEN_ENV = "FIELDSYNC_API_TOKEN"
WRITE_METHODS = frozenset({"PUT", "POST", "PATCH", "DELETE"})
WRITE_TYPES = frozenset({"application/json", "application/x-ndjson"})


def new_token() -> str:
    """`fsl_` and 256 random bits, URL-safe base64 (47 characters)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def read_token(path: Path) -> str:
    """The token in `path`, refused if group or others can read the file."""
    check_private_file(path, "API token")
    token = path.read_text(encoding="utf-8").strip()
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: not an API token; delete it and run `fieldsync-agent init`")
    return token


def ensure_token(path: Path) -> tuple[str, bool]:
    """The token in `path`, creating it (0600, atomically, never overwriting) if missing.

    Returns (token, created)."""
    if path.exists():
        return read_token(path), False
    try:
        with atomic_write(path, mode=0o600, exclusive=True, text=True) as f:
            f.write(new_token() + "\n")
    except FileExistsError:  # another process made it first: use theirs
        return read_token(path), False
    return read_token(path), True


def client_token(data_dir: Path) -> str:
    """The token an app sends: `$FIELDSYNC_API_TOKEN` if set, else `<data_dir>/api-token`."""
    if token := os.environ.get(TOKEN_ENV, "").strip():
        return token
    path = data_dir / TOKEN_FILENAME
    if not path.exists():
        raise FileNotFoundError(
            f"no API token at {path}: run `fieldsync-agent init` (or set {TOKEN_ENV})"
        )
    return read_token(path)


def client_headers(data_dir: Path, path: str = "") -> dict[str, str]:
    """The headers an app on this machine sends: the bearer token and the content type of a
    body to `path` (NDJSON for `/bulk`, JSON otherwise)."""
    content_type = "application/x-ndjson" if path.endswith("/bulk") else "application/json"
    return {"Authorization": f"Bearer {client_token(data_dir)}", "Content-Type": content_type}


def _refuse(
    request: web.Request, status: int, rule: str, message: str, **headers: str
) -> web.Response:
    log.warning("refused %s %s from %s: %s", request.method, request.path, request.remote, message)
    return web.json_response({"error": rule, "message": message}, status=status, headers=headers)


def _host_problem(request: web.Request) -> str | None:
    host = request.headers.get("Host")
    if host is None:
        return "a Host header naming a loopback address is required"
    try:
        name = urlsplit("//" + host).hostname
    except ValueError:
        name = None
    if name is None or not is_loopback_host(name):
        return (
            f"Host {host!r} is not a loopback address: the local API answers only requests "
            "addressed to 127.0.0.1, [::1] or localhost"
        )
    return None


def _local_port(request: web.Request) -> int | None:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    return int(sockname[1]) if sockname else None


def _own_origin(request: web.Request, origin: str, allow_remote: bool) -> bool:
    """Is `origin` the address this request was sent to (a page the agent itself served)?"""
    try:
        parts = urlsplit(origin)
        port = parts.port
    except ValueError:
        return False
    if parts.scheme != request.scheme or parts.hostname is None:
        return False
    if (port or {"http": 80, "https": 443}[parts.scheme]) != _local_port(request):
        return False
    if allow_remote:
        host = urlsplit("//" + request.headers.get("Host", "")).hostname
        return parts.hostname == host
    return is_loopback_host(parts.hostname)


def _bearer(request: web.Request) -> str | None:
    scheme, _, value = request.headers.get("Authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def access_guard(token: str, token_path: Path, *, allow_remote: bool = False) -> Middleware:
    """The aiohttp middleware making the four checks above; outermost, so it runs first."""
    expected = token.encode("utf-8")
    unauthorised = (
        "this API needs the header `Authorization: Bearer <token>`, with the token from "
        f"{token_path} (or ${TOKEN_ENV})"
    )

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not allow_remote and (problem := _host_problem(request)) is not None:
            return _refuse(request, 403, "host_not_allowed", problem)
        origin = request.headers.get("Origin")
        if origin is not None and not _own_origin(request, origin, allow_remote):
            message = f"requests from Origin {origin!r} are refused: only the agent's own address"
            return _refuse(request, 403, "origin_not_allowed", message)
        given = _bearer(request)
        if given is None or not hmac.compare_digest(
            given.encode("utf-8", "surrogateescape"), expected
        ):
            wrong = "the API token is wrong; " if given is not None else ""
            return _refuse(
                request,
                401,
                "unauthorized",
                wrong + unauthorised,
                **{"WWW-Authenticate": 'Bearer realm="fieldsync-agent"'},
            )
        if request.method in WRITE_METHODS and request.content_type not in WRITE_TYPES:
            sent = request.headers.get("Content-Type", "none")
            return _refuse(
                request,
                415,
                "unsupported_media_type",
                f"{request.method} needs Content-Type application/json (or application/x-ndjson "
                f"for bulk), got {sent}",
            )
        return await handler(request)

    return guard
