"""Client authentication: the webui's ``--api-auth`` (HTTP Basic) and optional API keys.

Which requests need credentials is decided by the matched route's path and the method, never
by a list of handlers, so routes added later are protected without changes here:

- open, as the webui leaves them open: ``/sdapi/v1/loras``, ``/sdapi/v1/refresh-loras``,
  ``/internal/*``, ``/openapi.json``, ``/docs``, ``/redoc``;
- with ``public_status``: GET/HEAD of ``/cluster``, ``/cluster/*`` and ``/metrics``;
- everything else, every ``/cluster/*`` write included: credentials, when any are configured.

Unknown routes and wrong methods are answered 404/405 without asking for credentials, as the
webui does (FastAPI routes before it runs dependencies); they reach no handler.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
from collections.abc import Awaitable, Callable

from aiohttp import hdrs, web
from aiohttp.typedefs import Middleware

from sdproxy.config import ServerSettings
from sdproxy.errors import NotAuthenticated

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

OPEN_PATHS = frozenset(
    {"/sdapi/v1/loras", "/sdapi/v1/refresh-loras", "/openapi.json", "/docs", "/redoc"}
)
OPEN_PREFIXES = ("/internal/", "/docs/")
STATUS_PREFIXES = ("/cluster/",)
STATUS_PATHS = frozenset({"/cluster", "/metrics"})
READ_METHODS = frozenset({hdrs.METH_GET, hdrs.METH_HEAD})

# The webui's (FastAPI HTTPBasic + Api.auth) 401 details, reference section 5.
NOT_AUTHENTICATED = "Not authenticated"
INVALID_CREDENTIALS = "Invalid authentication credentials"
INCORRECT_PASSWORD = "Incorrect username or password"
INCORRECT_KEY = "Incorrect API key"


def needs_credentials(method: str, path: str, *, public_status: bool) -> bool:
    """Whether a request for ``path`` (a route's canonical path) must authenticate."""
    if path in OPEN_PATHS or path.startswith(OPEN_PREFIXES):
        return False
    is_status = path in STATUS_PATHS or path.startswith(STATUS_PREFIXES)
    return not (public_status and is_status and method in READ_METHODS)


def _digest(text: str) -> bytes:
    # Comparing fixed-length digests keeps the comparison time independent of lengths.
    return hashlib.sha256(text.encode()).digest()


class ClientAuth:
    """The configured client credentials, kept only as digests."""

    def __init__(self, server: ServerSettings) -> None:
        self._passwords: list[bytes] = []
        if server.api_auth is not None:
            entries = server.api_auth.get_secret_value().split(",")
            self._passwords = [_digest(entry) for entry in entries]
        self._keys = [_digest(key.get_secret_value()) for key in server.api_keys]
        self.enabled = bool(self._passwords or self._keys)

    def check(self, header: str | None) -> None:
        """Return if ``header`` (Authorization) holds valid credentials, else raise 401."""
        scheme, _, param = (header or "").strip().partition(" ")
        scheme = scheme.lower()
        if scheme == "bearer" and self._keys:
            if not _matches_any(_digest(param.strip()), self._keys):
                raise NotAuthenticated(INCORRECT_KEY)
            return
        if scheme != "basic":
            raise NotAuthenticated(NOT_AUTHENTICATED)
        try:
            decoded = base64.b64decode(param.strip()).decode("ascii")
        except (binascii.Error, UnicodeDecodeError):
            raise NotAuthenticated(INVALID_CREDENTIALS) from None
        _, colon, _ = decoded.partition(":")
        if not colon:
            raise NotAuthenticated(INVALID_CREDENTIALS)
        if not _matches_any(_digest(decoded), self._passwords):
            raise NotAuthenticated(INCORRECT_PASSWORD)


def _matches_any(digest: bytes, expected: list[bytes]) -> bool:
    """Compare against every entry, without stopping early, so timing tells nothing."""
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(digest, candidate)
    return found


def auth_middleware(server: ServerSettings) -> Middleware:
    """The middleware that asks for credentials where ``server`` says they are needed."""
    auth = ClientAuth(server)

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        match_info = request.match_info
        if auth.enabled and match_info.http_exception is None:
            path = match_info.route.resource.canonical if match_info.route.resource else ""
            if needs_credentials(request.method, path, public_status=server.public_status):
                try:
                    auth.check(request.headers.get(hdrs.AUTHORIZATION))
                except NotAuthenticated as exc:
                    log.info("401 for %s %s from %s: %s", request.method, path, request.remote, exc)
                    raise
        return await handler(request)

    return middleware
