"""Error dialects: each wire format answers failures in its own shape.

A router made by :func:`dialect_router` renders every error raised in its routes (request
validation included) with its dialect; the middleware and the app-level handlers (401, 413,
unknown routes) find the dialect of the route a path belongs to with :func:`dialect_for`, so
no code looks at URLs to pick a shape. OpenAI's envelope is the default.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ClassVar

from fastapi import APIRouter, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import Scope

from allinone.errors import (
    APIError,
    InvalidRequestError,
    envelope,
    retry_headers,
    validation_message,
)


class ErrorDialect:
    """OpenAI's error envelope ``{"error": {"message", "type", "param", "code"}}``; validation
    errors are 400 ``invalid_request_error`` naming the field as ``messages.0.content``.
    Subclasses override :meth:`body` (and :meth:`validation`) for other wire formats."""

    brackets: ClassVar[bool] = False  # write list indexes as ``questions[0]``

    def body(self, err: APIError) -> dict[str, Any]:
        """The JSON body of an error."""
        return envelope(err.message, err.type, err.code, err.param)

    def status(self, err: APIError) -> int:
        """The HTTP status of an error (a dialect may use its own, e.g. Anthropic's 529)."""
        return err.status

    def response(self, err: APIError) -> JSONResponse:
        """An APIError as this dialect's JSON response."""
        return JSONResponse(
            self.body(err), status_code=self.status(err), headers=retry_headers(err)
        )

    def validation(self, exc: RequestValidationError) -> JSONResponse:
        """A body that failed validation: 400 naming the first field at fault."""
        message, param = validation_message(exc, brackets=self.brackets)
        return self.response(InvalidRequestError(message, param=param))


class DecisionsDialect(ErrorDialect):
    """OpenAI's decisions routes: fields written ``questions[0].levels``."""

    brackets = True


class TypeSafeDialect(ErrorDialect):
    """TypeSafe's System One: validation errors and broken rules 422 with FastAPI's
    ``{"detail": [...]}`` (also for a body that is not JSON, as its conformance suite expects),
    others ``{"detail": {"error_type", "message"}}``."""

    def body(self, err: APIError) -> dict[str, Any]:
        return {"detail": {"error_type": err.type, "message": err.message}}

    def response(self, err: APIError) -> JSONResponse:
        if err.status != 400 or err.type != "invalid_request_error":
            return super().response(err)
        # A rule the request breaks: one detail entry located at the field, as FastAPI's own
        # validation writes it (``questions[2].criteria`` -> body, questions, 2, criteria).
        path = (err.param or "").replace("]", "").replace("[", ".")
        loc = ["body", *(p for p in path.split(".") if p)]
        entry = {"type": "value_error", "loc": loc, "msg": err.message, "input": None}
        return JSONResponse(
            {"detail": [entry]}, status_code=422, headers={"x-should-retry": "false"}
        )

    def validation(self, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": jsonable_encoder(exc.errors())},
            status_code=422,
            headers={"x-should-retry": "false"},
        )


OPENAI = ErrorDialect()


def error_response(exc: BaseException, request: Request, dialect: ErrorDialect) -> Response:
    """Any exception raised while serving ``request`` as ``dialect``'s response (see
    :func:`allinone.errors.api_error_for`)."""
    from allinone.errors import api_error_for

    response = dialect.response(api_error_for(exc, request))
    if not isinstance(exc, (APIError, ValueError)) and response.status_code >= 500:
        # A bug: the connection closes after the answer, so a keep-alive client (httpx, the
        # openai SDK) does not send its next request on a connection Starlette then drops.
        response.headers["Connection"] = "close"
    return response


def dialect_router(dialect: ErrorDialect = OPENAI, **kwargs: Any) -> APIRouter:
    """An APIRouter whose routes answer every error in ``dialect``'s shape."""

    class Route(APIRoute):
        error_dialect: ClassVar[ErrorDialect] = dialect

        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def handle(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as exc:
                    return dialect.validation(exc)
                except StarletteHTTPException:
                    raise  # a body FastAPI cannot parse: the app's handler, in this dialect
                except Exception as exc:
                    return error_response(exc, request, dialect)

            return handle

    return APIRouter(route_class=Route, **kwargs)


def dialect_for(scope: Scope) -> ErrorDialect:
    """The error dialect of the route ``scope``'s path belongs to (any method), else OpenAI's."""
    app = scope.get("app")
    routes = getattr(getattr(app, "router", None), "routes", ())
    probe = {**scope, "type": "http", "method": scope.get("method", "GET")}
    for route in routes:
        match, _ = route.matches(probe)
        if match is not Match.NONE:
            # FastAPI keeps an included router as one route that points back at the router
            router = getattr(route, "original_router", None)
            owner = router.route_class if router is not None else route
            return getattr(owner, "error_dialect", OPENAI)
    return OPENAI
