"""NodeClient: the only code that talks HTTP to webui nodes.

It knows how to call a node and what its answers mean as errors; what a failure means for the
node's health is the cluster's business (cluster/state.py).
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import aiohttp
import orjson
from yarl import URL

from sdproxy.config import NodeSettings, SchedulerSettings
from sdproxy.errors import (
    NodeAuthFailed,
    NodeBadResponse,
    NodeRaised,
    NodeRejected,
    NodeTimeout,
    NodeUnreachable,
)

# The webui's api_middleware answers any exception a job raises with these keys.
_WEBUI_ERROR_KEYS = frozenset({"error", "detail", "body", "errors"})
_DECODE_IN_THREAD_BYTES = 1 << 20
_JSON_HEADERS = {"Content-Type": "application/json", "Accept": "application/json"}


class NodeClient:
    """Calls one webui node's API over the app's shared ClientSession.

    Every aiohttp and timeout error is turned into a NodeError here, and only here.
    """

    def __init__(
        self,
        session: aiohttp.ClientSession,
        settings: NodeSettings,
        scheduler: SchedulerSettings,
    ) -> None:
        self.settings = settings
        self.name = settings.name
        self._session = session
        self._base = URL(settings.base_url)
        self._connect_timeout_s = scheduler.connect_timeout_s
        self._headers = dict(_JSON_HEADERS)
        if settings.username is not None and settings.password is not None:
            password = settings.password.get_secret_value()
            self._headers["Authorization"] = aiohttp.encode_basic_auth(settings.username, password)
        self._ssl = tls_context(settings)

    def url(self, path: str) -> URL:
        """The node's URL for ``path`` (relative, e.g. ``sdapi/v1/txt2img``)."""
        return self._base / path

    async def generate(self, kind: str, body: dict[str, Any], timeout_s: float) -> Any:
        """POST a txt2img/img2img body and return the decoded JSON answer."""
        return await self.request("POST", f"sdapi/v1/{kind}", body, timeout_s=timeout_s)

    async def probe(self, timeout_s: float) -> None:
        """One cheap call that works on a busy node too; raises NodeError if it fails."""
        await self.request(
            "GET", "sdapi/v1/progress", params={"skip_current_image": "true"}, timeout_s=timeout_s
        )

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        timeout_s: float,
        params: dict[str, str] | None = None,
    ) -> Any:
        """One call to the node; the decoded JSON answer, or a NodeError."""
        data = orjson.dumps(body) if body is not None else None
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=self._connect_timeout_s)
        try:
            async with self._session.request(
                method,
                self.url(path),
                data=data,
                params=params,
                headers=self._headers,
                timeout=timeout,
                ssl=self._ssl,
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except TimeoutError as exc:
            raise NodeTimeout(self.name, f"no answer within {timeout_s:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            reason = getattr(exc.certificate_error, "verify_message", None) or "not trusted"
            raise NodeUnreachable(self.name, f"TLS certificate rejected: {reason}") from exc
        except aiohttp.ClientConnectorError as exc:
            raise NodeUnreachable(self.name, f"cannot connect: {exc.os_error}") from exc
        except aiohttp.ClientError as exc:
            raise NodeUnreachable(self.name, f"connection failed: {type(exc).__name__}") from exc
        if len(raw) > _DECODE_IN_THREAD_BYTES:  # a batch of images: keep the event loop free
            return await asyncio.to_thread(self._decode, status, raw)
        return self._decode(status, raw)

    def _decode(self, status: int, raw: bytes) -> Any:
        try:
            payload = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if 400 <= status < 500:
                payload = raw.decode(errors="replace")
            else:
                raise NodeBadResponse(
                    self.name, f"answered {status} with a body that is not JSON"
                ) from exc
        if status in (401, 403):
            # Not the client's fault: passing the 401 on would blame the client's credentials.
            raise NodeAuthFailed(
                self.name,
                f"refused sdproxy's credentials ({status} {_error_text(payload)}): "
                "check username and password for this node",
            )
        if 400 <= status < 500:
            raise NodeRejected(self.name, status, payload)
        if status == 500 and isinstance(payload, dict) and payload.keys() >= _WEBUI_ERROR_KEYS:
            raise NodeRaised(self.name, payload)
        if status >= 500 or status < 200 or status >= 300:
            raise NodeBadResponse(
                self.name,
                f"answered {status}: {_error_text(payload)}",
                answered=status,
                answer=payload,
            )
        return payload


def tls_context(settings: NodeSettings) -> ssl.SSLContext | bool:
    """The TLS settings for requests to one node, built once; True: aiohttp's default."""
    if settings.url.scheme != "https":
        return True
    cafile = str(settings.ca_file) if settings.ca_file is not None else None
    context = ssl.create_default_context(cafile=cafile)
    if not settings.verify_tls:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _error_text(payload: Any) -> str:
    """The message of a webui error body, or a short description of an unexpected one."""
    if isinstance(payload, dict):
        for key in ("errors", "detail", "message", "error"):
            value = payload.get(key)
            if isinstance(value, str) and value:
                return value[:200]
    return "unexpected body"
