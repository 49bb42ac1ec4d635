"""The exception tree, and how any exception maps to the error a client sees.

Errors map to statuses by exception type, never by message text: ``InputError`` (the caller's
to fix) is 400 naming its field (404 when it names something that does not exist), engine
overload 503 with Retry-After, a dead engine 503, a remote engine's failure 502/504;
unexpected exceptions become a generic 500 and their details go to the log. The body's shape
is the API family's own (``allinone.api.dialects``); OpenAI's envelope is the default.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from allinone.backends.base import (
    BackendError,
    EngineDeadError,
    EngineOverloadedError,
    UpstreamError,
    UpstreamTimeoutError,
)
from allinone.serving.errors import InputError

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with an HTTP status and an OpenAI-style type/code."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code:
            self.code = code
        self.headers = headers or {}


class InvalidRequestError(APIError):
    """400: the request is malformed or breaks a limit."""

    status, type, code = 400, "invalid_request_error", "invalid_request"


class AuthenticationError(APIError):
    """401: missing or wrong API key."""

    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFoundError(APIError):
    """404: unknown task, model or route."""

    status, type, code = 404, "not_found_error", "not_found"


class PayloadTooLargeError(APIError):
    """413: the body is over the size cap."""

    status, type, code = 413, "invalid_request_error", "payload_too_large"


class NotEnabledError(APIError):
    """501: the route exists but this server was started without what it needs."""

    status, type, code = 501, "not_implemented_error", "not_enabled"


class OverloadedError(APIError):
    """503 with Retry-After: too much work queued; retry later."""

    status, type, code = 503, "overloaded_error", "overloaded"


class BadGatewayError(APIError):
    """502: the remote engine failed or is down."""

    status, type, code = 502, "upstream_error", "upstream_error"


class GatewayTimeoutError(APIError):
    """504: the request ran longer than the server's request timeout."""

    status, type, code = 504, "timeout_error", "timeout"


class NotReadyError(APIError):
    """503: the model is still loading (or failed to load)."""

    status, type, code = 503, "service_unavailable", "not_ready"


class ClientClosedError(APIError):
    """499 (nginx's code): the client closed the connection before the answer; nobody reads
    this response, it exists for the logs and metrics."""

    status, type, code = 499, "client_closed", "client_closed"


class ShuttingDownError(NotReadyError):
    """503: the server's drain deadline passed while this request was still running."""

    code = "shutting_down"


def envelope(message: str, type_: str, code: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def retry_headers(exc: APIError) -> dict[str, str]:
    """An error's headers: its own, ``nosniff``, and ``x-should-retry: false`` for errors a
    retry cannot fix (4xx but 408/409/429), which the openai and anthropic SDKs obey."""
    headers = dict(exc.headers)
    # Also set by the outermost middleware; here too for the answers Starlette's error handler
    # sends from outside every middleware (an unexpected exception's 500).
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
        headers.setdefault("x-should-retry", "false")
    return headers


def to_api_error(exc: BaseException, retry_after: int = 1, param: str | None = None) -> APIError:
    """Map any exception raised while serving to the APIError a client should see.

    ``param``: the request field an input error is about when the error names none (the API
    family's input field: ``messages`` on chat, ``input`` on the task routes)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return NotReadyError(f"{exc}; the server is restarting, retry shortly", code="engine_dead")
    if isinstance(exc, EngineOverloadedError):
        return OverloadedError(str(exc), headers={"Retry-After": str(retry_after)})
    if isinstance(exc, InputError):
        where = exc.param or param
        if exc.not_found:
            return NotFoundError(str(exc), param=where, code=exc.code)
        return InvalidRequestError(str(exc), param=where, code=exc.code)
    if isinstance(exc, UpstreamTimeoutError):
        return GatewayTimeoutError(str(exc), code="upstream_timeout")
    if isinstance(exc, UpstreamError):
        return BadGatewayError(str(exc))
    if isinstance(exc, BackendError):
        log.error("engine error: %s", exc)
        return APIError("the engine failed to run the request; retry it", code="engine_error")
    log.error("unexpected error", exc_info=exc)
    return APIError("internal server error")


def api_error_for(exc: BaseException, request: Request) -> APIError:
    """:func:`to_api_error` for an exception raised while serving ``request``: an input error
    without a field gets the API family's input field (``request.state.input_param``, set by
    its serving class); a full wait queue is counted and answered with the server's
    Retry-After (429 instead of 503 when the operator chose it)."""
    state = getattr(request.app.state, "server", None)
    if isinstance(exc, EngineOverloadedError) and state is not None:
        state.metrics.rejected.labels("queue_full").inc()
        err = OverloadedError(str(exc), headers=state.admission.retry_after())
        if state.settings.server.overload_status == 429:
            err.status, err.type, err.code = 429, "rate_limit_error", "rate_limited"
        return err
    return to_api_error(exc, param=getattr(request.state, "input_param", None))


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def validation_message(
    exc: RequestValidationError, brackets: bool = False
) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    # A value that failed our own check (value_error) explains itself better than the union
    # members it also failed to match.
    first = next((e for e in errors if e.get("type") == "value_error"), errors[0])
    if first.get("type") == "json_invalid":
        return f"the body is not valid JSON: {first.get('msg')}; send a JSON object", None
    param = _field_path(first, brackets)
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        msg = "this route does not take this field; remove it (or check its spelling)"
    where = f"{param}: " if param else ""
    others = {_field_path(e, brackets) for e in errors} - {param}
    more = f" (and {len(others)} more problem(s))" if others else ""
    return f"{where}{msg}{more}", param


# Tags pydantic puts in a location after a list index when a discriminated union member fails
# (``questions.0.predicate.name``): the client's own ``type`` value, not a field.
_UNION_TAGS = {
    "predicate", "choice", "score", "message", "function_call", "function_call_output",
    "custom_tool_call", "custom_tool_call_output", "input_text", "input_image", "input_json",
    "output_text", "refusal",
}  # fmt: skip


def _field_path(error: dict, brackets: bool = False) -> str | None:
    """The field's path (``messages.0.content``; with ``brackets``, as OpenAI's decisions
    errors write it: ``questions[0].levels``). pydantic also names union members in the
    location ("str", "list[str]", "function-after[...]"), which a client cannot act on."""
    out: list[str] = []
    prev: object = None
    for p in error.get("loc", ()):
        skip = p == "body" or (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))
        if isinstance(p, str) and isinstance(prev, int) and p in _UNION_TAGS:
            skip = True
        prev = p
        if skip:
            continue
        if isinstance(p, int) and brackets and out:
            out[-1] += f"[{p}]"
        else:
            out.append(str(p))
    return ".".join(out) or None


def register_exception_handlers(app: FastAPI) -> None:
    """Answer every failure raised outside a dialect router's routes (see
    ``allinone.api.dialects``) in the dialect of the route its path belongs to: unknown
    routes, wrong methods, and bugs."""
    from allinone.api.dialects import OPENAI, dialect_for, error_response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        return dialect_for(request.scope).validation(exc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        dialect = dialect_for(request.scope)
        if exc.status_code == 404:
            return OPENAI.response(NotFoundError("no such route; see /docs for the API"))
        if exc.status_code == 405:
            err = InvalidRequestError("method not allowed on this route", code="method_not_allowed")
            err.status = 405
            return dialect.response(err)
        err = InvalidRequestError(str(exc.detail))
        err.status = exc.status_code
        return dialect.response(err)

    # Known errors raised outside dialect routes (the probes) are answered here, inside the
    # app; only a bug reaches the generic handler, which Starlette runs in its outermost
    # middleware and then logs with a traceback.
    async def _known(request: Request, exc: Exception) -> Response:
        return error_response(exc, request, dialect_for(request.scope))

    for known in (APIError, InputError, BackendError):
        app.add_exception_handler(known, _known)
    app.add_exception_handler(Exception, _known)
