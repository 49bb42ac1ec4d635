"""The exception tree and the one error envelope every failure is answered with.

Every error body is ``{"error": {"message", "type", "param", "code"}}`` (OpenAI's shape), also
for validation errors and unknown routes, except on TypeSafe's ``/v1/systemone``, which answers
in TypeSafe's shapes: validation errors 422 with FastAPI's ``{"detail": [...]}``, others
``{"detail": {"error_type", "message"}}``. Errors a retry cannot fix (4xx but 408/409/429)
carry ``x-should-retry: false``, which the openai SDK obeys. Errors map to statuses by exception
type, never by message text; unexpected exceptions become a generic 500 and their details go to
the log.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from allinone.backends.base import (
    BackendError,
    EngineDeadError,
    EngineOverloadedError,
    ParamError,
    PromptTooLongError,
    UpstreamError,
    UpstreamTimeoutError,
)
from allinone.tasks import TaskError

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
    """The one error body."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def is_systemone(path: str) -> bool:
    """True for TypeSafe's route, whose errors have TypeSafe's shapes."""
    return path.rstrip("/") == "/v1/systemone"


def error_response(exc: APIError, path: str = "") -> JSONResponse:
    """An APIError as a JSON response (``path``: the request's, which picks the body shape)."""
    headers = dict(exc.headers)
    # Also set by the outermost middleware; here too for the answers Starlette's error handler
    # sends from outside every middleware (an unexpected exception's 500).
    headers.setdefault("X-Content-Type-Options", "nosniff")
    if 400 <= exc.status < 500 and exc.status not in (408, 409, 429):
        headers.setdefault("x-should-retry", "false")
    if is_systemone(path):
        body: dict[str, Any] = {"detail": {"error_type": exc.type, "message": exc.message}}
    else:
        body = envelope(exc.message, exc.type, exc.code, exc.param)
    return JSONResponse(body, status_code=exc.status, headers=headers)


def to_api_error(exc: BaseException, retry_after: int = 1, param: str | None = None) -> APIError:
    """Map any exception raised while serving to the APIError a client should see.

    ``param``: the request field an input error is about when the error names none (the route
    knows: ``input`` on the task routes, ``messages`` on chat)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, EngineDeadError):
        return NotReadyError(f"{exc}; the server is restarting, retry shortly", code="engine_dead")
    if isinstance(exc, EngineOverloadedError):
        return OverloadedError(str(exc), headers={"Retry-After": str(retry_after)})
    if isinstance(exc, TaskError):
        where = getattr(exc, "param", None) or param
        if getattr(exc, "not_found", False):
            return NotFoundError(str(exc), param=where)
        return InvalidRequestError(str(exc), param=where)
    if isinstance(exc, ParamError):
        return InvalidRequestError(str(exc), param=exc.param or param)
    if isinstance(exc, PromptTooLongError):
        return InvalidRequestError(
            str(exc), param=param or "messages", code="context_length_exceeded"
        )
    if isinstance(exc, UpstreamTimeoutError):
        return GatewayTimeoutError(str(exc), code="upstream_timeout")
    if isinstance(exc, UpstreamError):
        return BadGatewayError(str(exc))
    if isinstance(exc, BackendError):
        log.error("engine error: %s", exc)
        return APIError("the engine failed to run the request; retry it", code="engine_error")
    log.error("unexpected error", exc_info=exc)
    return APIError("internal server error")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _validation_message(
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
    """Answer every failure with the envelope: API errors, validation, unknown routes, bugs."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        path = request.url.path
        message, param = _validation_message(exc, brackets=path.startswith("/v1/decisions"))
        if is_systemone(path):
            # TypeSafe's own validation answer: FastAPI's 422 body, invalid JSON included
            # (the conformance suite expects 422 detail[] for a body that is not JSON)
            return JSONResponse(
                {"detail": jsonable_encoder(exc.errors())},
                status_code=422,
                headers={"x-should-retry": "false"},
            )
        return error_response(InvalidRequestError(message, param=param), path)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        path = request.url.path
        if exc.status_code == 404:
            return error_response(NotFoundError("no such route; see /docs for the API"), path)
        if exc.status_code == 405:
            err = InvalidRequestError("method not allowed on this route", code="method_not_allowed")
            err.status = 405
            return error_response(err, path)
        err = InvalidRequestError(str(exc.detail))
        err.status = exc.status_code
        return error_response(err, path)

    # Known errors are handled here, inside the app; only a bug reaches the generic handler
    # (which Starlette runs in its outermost middleware and then logs with a traceback).
    async def _known(request: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc), request.url.path)

    async def _overloaded(request: Request, exc: Exception) -> JSONResponse:
        state = request.app.state.server
        state.metrics.rejected.labels("queue_full").inc()
        err = OverloadedError(str(exc), headers=state.retry_after())
        if state.settings.server.overload_status == 429:
            err.status, err.type, err.code = 429, "rate_limit_error", "rate_limited"
        return error_response(err, request.url.path)

    app.add_exception_handler(EngineOverloadedError, _overloaded)
    for known in (APIError, TaskError, PromptTooLongError, BackendError):
        app.add_exception_handler(known, _known)

    @app.exception_handler(Exception)
    async def _any(request: Request, exc: Exception) -> JSONResponse:
        response = error_response(to_api_error(exc), request.url.path)
        # Starlette re-raises a bug after this answer is sent and uvicorn then drops the
        # connection: without this header a keep-alive client (httpx, the openai SDK) would send
        # its next request on it and see a reset instead of an answer.
        response.headers["Connection"] = "close"
        return response
