"""The exception tree of sdproxy and the webui-shaped JSON bodies errors turn into.

::

    SdproxyError
    ├── ConfigError                 bad config file or command-line argument
    ├── ClientError                 the client's request is at fault (4xx)
    │   ├── RequestValidationError  422, FastAPI's validation body
    │   ├── BodyTooLarge            413
    │   ├── BodyTimeout             408: the body did not arrive within body_timeout_s
    │   ├── BadBody                 400: a body that cannot be read (server/bodies.py)
    │   ├── UnsupportedEncoding     415: a Content-Encoding not decoded (server/bodies.py)
    │   ├── ExpectationFailed       417: an Expect but 100-continue (server/bodies.py)
    │   ├── ClientGone              499 (nginx's code): the client left before its body arrived
    │   ├── NotAuthenticated        401, the webui's --api-auth bodies
    │   ├── NotFound                404
    │   ├── QueueFull               429: too many images already queued; Retry-After
    │   ├── NotSupported            501: node-local actions (create/*, train/*)
    │   └── UnknownCheckpoint       422 (the webui's 500 body): POST options names no model
    ├── NoNodeAvailable             503: no healthy node can take the work
    ├── ShuttingDown                503: still running after shutdown_grace_s (server/drain.py)
    ├── RequestTimeout              504: the request's overall deadline passed
    ├── InternalError               500: a bug in sdproxy met the request twice (request id)
    ├── GenerationFailed            502: shares failed and no node could take them over
    ├── NodesFailed                 502: a call sent to every node failed on some
    └── NodeError                   one call to one node failed
        ├── NodeUnreachable         refused, reset, DNS: nothing usable came back
        ├── NodeTimeout             the node did not answer within the deadline
        ├── NodeBadResponse         5xx, malformed or incomplete JSON
        │   ├── NodeUnexpectedStatus  a status or body that is not the webui's (3xx, 429, HTML)
        │   ├── NodeAnswerTooLarge  more bytes than the request can need
        │   ├── NodeWrongAnswer     200, but not what was asked (seeds, images, info)
        │   └── NodeRaised          500 with the webui's exception body: the job raised (422)
        ├── NodeAuthFailed          401/403: the node refused sdproxy's own credentials
        └── NodeRejected            a webui-shaped 4xx: the request is at fault

Which failures are whose fault:

- ``NodeUnreachable``, ``NodeTimeout`` and ``NodeBadResponse`` blame the node: it is marked down
  at once and the images it had not delivered are planned again onto the other nodes, with the
  same seeds. That covers a 5xx, a body that is not JSON or is cut short, an answer larger than
  the request can need (``NodeAnswerTooLarge``), a 200 whose content is not what was asked
  (``NodeWrongAnswer``: seeds, image count, images that are not base64 images, info nested too
  deep) and any status whose body is not the webui's own (``NodeUnexpectedStatus``).
- ``NodeRejected`` blames the request: the node stays up and the client gets the node's status
  and body unchanged, as every node would answer the same. Only a **webui-shaped 4xx** is that
  (``sdproxy.core.answers.is_webui_error``), i.e. a 4xx other than 401/403 (``NodeAuthFailed``)
  and 407, 408, 413, 421, 429, 431 (what proxies and servers in the way answer, never the
  webui), whose JSON body is one the webui's own handlers produce:

  - ``{"detail": "<text>"}``: starlette's HTTPException (unknown route, wrong method, and every
    HTTPException on Forge, whose api_middleware is off);
  - ``{"detail": [{"loc": [...], "msg": "...", "type": "..."}, ...]}`` with status 422:
    FastAPI's validation answer (pydantic 1 on A1111, pydantic 2 items on Forge);
  - ``{"error": "<class>", "detail": ..., "body": ..., "errors": "<text>"}``: A1111's
    ``api_middleware.handle_exception`` (e.g. 422 "Script 'x' not found", 404 "Init image not
    found"), or the same with ``message`` instead of ``errors`` (Forge's ``_handle_exception``).

  Everything else (an HTML 404 from a proxy in the way, a 429 or 413 with any body, a 3xx, a
  4xx whose body is text or other JSON) is ``NodeUnexpectedStatus``: node trouble. So is a 404
  or 405 ``{"detail": "Not Found"}`` for a generation or the health probe: a webui serving the
  API always has those routes, so the node is not one (started without ``--api``, or a proxy
  in the way). Redirects are never followed: a 3xx is the node's trouble too.
- A 500 whose body is the webui's own error JSON (one of the shapes above) is ``NodeRaised``,
  and ambiguous: a CUDA out-of-memory or a broken extension on one node looks the
  same as a request every node fails (an unknown ``override_settings`` key is a 500 ``KeyError``).
  The node stays up and, for a generation, the images are tried once on another node. If that
  node renders them, the first node was at fault and is taken out like a failed node; if it
  raises too, or no other node may take the work, the request is at fault: the client gets the
  node's own body with status 422 and no node is taken out. (Calls that go to one node only, such
  as interrogate or extras, pass that body on at once.)

Only ``nodes/client.py`` catches aiohttp's and asyncio's errors and raises ``NodeError``s from
them; only the error middleware in ``server/app.py`` turns these exceptions into HTTP responses,
through each error's ``status``, :meth:`SdproxyError.body` and :meth:`SdproxyError.headers`.
"""

from __future__ import annotations

from typing import Any


class SdproxyError(Exception):
    """Base of every error sdproxy raises on purpose."""

    status = 500
    # The "error" field of the body: the class name, or the webui's own exception class
    # ("HTTPException") where the webui would have answered the same thing.
    error_name: str | None = None

    def body(self) -> dict[str, Any]:
        """The webui's error body (``api_middleware.handle_exception``) for this error."""
        return webui_error_body(self.error_name or type(self).__name__, detail=str(self))

    def headers(self) -> dict[str, str]:
        return {}


class ConfigError(SdproxyError):
    """The configuration file or a command-line argument is invalid."""


class ClientError(SdproxyError):
    """The client's request is at fault."""

    status = 400


class RequestValidationError(ClientError):
    """A request body failed validation; the body mirrors FastAPI's 422 answer."""

    status = 422

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))

    def body(self) -> dict[str, Any]:
        return {"detail": self.errors}


class BodyTooLarge(ClientError):
    """The request body is larger than the configured limit."""

    status = 413
    error_name = "HTTPException"


class BodyTimeout(ClientError):
    """The client sent its body too slowly."""

    status = 408
    error_name = "HTTPException"


class ClientGone(ClientError):
    """The client closed the connection before its body arrived; nobody reads the answer.

    It is counted and logged as the client's doing (nginx's 499), not as an error of sdproxy.
    """

    status = 499


class NotAuthenticated(ClientError):
    """Missing or wrong client credentials; like the webui, no WWW-Authenticate header."""

    status = 401
    error_name = "HTTPException"


class NotFound(ClientError):
    """Something the request names does not exist (as the webui's 404 ``HTTPException``)."""

    status = 404
    error_name = "HTTPException"


class QueueFull(ClientError):
    """The cluster's queue holds as many images as it is configured to; try again later."""

    status = 429

    def __init__(self, message: str, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class NotSupported(ClientError):
    """sdproxy refuses this on purpose: it would change one node's local state."""

    status = 501
    error_name = "HTTPException"


class UnknownCheckpoint(ClientError):
    """POST /options names a checkpoint no healthy node has (the webui's RuntimeError body).

    The webui answers it with 500; it is the client's input, so sdproxy answers 422.
    """

    status = 422

    def body(self) -> dict[str, Any]:
        return webui_error_body("RuntimeError", errors=str(self))


class NoNodeAvailable(SdproxyError):
    """No healthy node can take the work right now."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class RequestTimeout(SdproxyError):
    """The request's overall deadline passed before every image was rendered."""

    status = 504


class InternalError(SdproxyError):
    """sdproxy itself failed on a request (a bug, logged with its traceback and request id).

    A job whose handling raises is tried once more on another node; a second failure gives up.
    """

    status = 500


class _NodeFailures(SdproxyError):
    """An error whose body names each node that failed (``nodes``: name -> reason)."""

    status = 502

    def __init__(self, message: str, failures: dict[str, str]) -> None:
        super().__init__(message)
        self.failures = failures

    def body(self) -> dict[str, Any]:
        body = super().body()
        body["nodes"] = self.failures
        return body


class GenerationFailed(_NodeFailures):
    """Shares of a request failed and no healthy node could take them over."""


class NodesFailed(_NodeFailures):
    """A call sent to several nodes failed on some of them; the body names them."""


class NodeError(SdproxyError):
    """A call to one node failed."""

    status = 502
    kind = "error"  # the ``kind`` label of sdproxy_node_failures_total

    def __init__(self, node: str, message: str) -> None:
        super().__init__(f"node {node!r}: {message}")
        self.node = node
        self.reason = message


class NodeUnreachable(NodeError):
    """The node could not be reached or dropped the connection."""

    kind = "unreachable"


class NodeTimeout(NodeError):
    """The node did not answer within the deadline."""

    status = 504
    kind = "timeout"


class NodeBadResponse(NodeError):
    """The node answered with a server error or a body sdproxy cannot use.

    ``answered`` and ``answer`` keep the node's own status and JSON body when it sent an error
    body, so one-node calls can pass the webui's own 500 on (e.g. KeyError for an unknown option).
    """

    kind = "bad_response"

    def __init__(
        self, node: str, message: str, *, answered: int | None = None, answer: Any = None
    ) -> None:
        super().__init__(node, message)
        self.answered = answered
        self.answer = answer
        if answered is not None and isinstance(answer, dict):
            self.status = answered

    def body(self) -> dict[str, Any]:
        if self.answered is not None and isinstance(self.answer, dict):
            return self.answer
        return super().body()


class NodeUnexpectedStatus(NodeBadResponse):
    """The node answered a status or body that is not the webui's own: node trouble.

    A redirect (never followed), a 429 or 413, an HTML page from a proxy in the way, a 4xx or
    5xx whose body is not one of the webui's error shapes, a 2xx other than 200.
    """

    kind = "unexpected_status"

    def __init__(self, node: str, status: int, message: str) -> None:
        super().__init__(node, f"answered {status} {message}")
        self.node_status = status


class NodeAnswerTooLarge(NodeBadResponse):
    """The node sent (or announced) more bytes than the request can need: it was cut off."""

    kind = "too_large"

    def __init__(self, node: str, limit_bytes: int) -> None:
        super().__init__(node, f"answer larger than {limit_bytes / 2**20:.1f} MiB")
        self.limit_bytes = limit_bytes


class NodeWrongAnswer(NodeBadResponse):
    """The node answered 200, but not with what it was asked for: seeds, images or info.

    ``reason`` reads "wrong answer: <what>", e.g. "wrong answer: all_seeds [5, 6] where [3, 4]
    were sent".
    """

    kind = "wrong_answer"

    def __init__(self, node: str, what: str) -> None:
        super().__init__(node, f"wrong answer: {what}")


class NodeAuthFailed(NodeError):
    """The node refused sdproxy's credentials: a configuration problem, not the client's."""

    kind = "auth_failed"


class NodeRaised(NodeBadResponse):
    """The node answered 500 with the webui's exception body: it is up, the job raised.

    Many such errors come from the request (an unknown override_settings key or option, a null
    cfg_scale, a missing upscaler), some from the node (out of memory). For generations the
    scheduler tries another node: if it renders the images, the first node was at fault and is
    taken out; if it raises too, or none is left, the request is at fault. The client then gets
    the node's own body with 422: sdproxy answers 5xx only for node trouble, never for input.
    """

    kind = "raised"

    def __init__(self, node: str, body: dict[str, Any]) -> None:
        # A1111 names the message "errors", Forge "message"; an HTTPException has "detail" only.
        error = body.get("errors") or body.get("message") or body.get("detail") or "an exception"
        message = f"raised {body.get('error', 'HTTPException')}: {str(error)[:200]}"
        super().__init__(node, message, answered=500, answer=body)
        self.status = 422


class NodeRejected(NodeError):
    """The node refused the request with a 4xx: the request, not the node, is at fault.

    The node's own status and JSON body are passed on to the client unchanged.
    """

    kind = "rejected"

    def __init__(self, node: str, status: int, body: Any) -> None:
        super().__init__(node, f"answered {status}")
        self.status = status
        self.node_body = body

    def body(self) -> dict[str, Any]:
        if isinstance(self.node_body, dict):
            return self.node_body
        return webui_error_body("HTTPException", detail=str(self.node_body))


def webui_error_body(error: str, *, detail: str = "", errors: str = "") -> dict[str, Any]:
    """The body the webui's ``handle_exception`` answers with (reference section 2.5)."""
    return {"error": error, "detail": detail, "body": "", "errors": errors}


def validation_error(loc: list[str | int], message: str, type_: str, **ctx: Any) -> dict[str, Any]:
    """One item of a FastAPI/pydantic-1 422 ``detail`` list."""
    item: dict[str, Any] = {"loc": loc, "msg": message, "type": type_}
    if ctx:
        item["ctx"] = ctx
    return item
