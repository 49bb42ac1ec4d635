"""``create_app``: the FastAPI application with its routes, limits and error handling."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allinone import __version__
from allinone.api.routes import health, openai, tasks
from allinone.api.state import ServerState
from allinone.backends.base import Backend
from allinone.errors import (
    PayloadTooLargeError,
    envelope,
    error_response,
    register_exception_handlers,
)
from allinone.settings import Settings
from allinone.tasks import TaskRegistry


class BodyLimitMiddleware:
    """Reads at most ``limit`` bytes of a request body; more is answered 413 before any route.

    The body is read up front and replayed, so routes never see a partial body and chunked
    uploads cannot slip past a Content-Length check."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        too_big = PayloadTooLargeError(
            f"the request body is over {self.limit} bytes (ALLINONE_MAX_BODY_BYTES); send less"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await error_response(too_big)(scope, receive, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def create_app(
    settings: Settings | None = None,
    backend_factory: Callable[[], Backend] | None = None,
    task_registry: TaskRegistry | None = None,
    load_in_background: bool = True,
) -> FastAPI:
    """Build the app. ``backend_factory`` defaults to the configured model and backend."""
    settings = settings or Settings()
    registry = task_registry or TaskRegistry.load(settings.server.tasks_dir)
    if backend_factory is None:
        from allinone.runtime import make_backend

        def backend_factory() -> Backend:
            return make_backend(settings)

    state = ServerState(settings=settings, tasks=registry, backend_factory=backend_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loader = threading.Thread(target=state.load, name="allinone-load", daemon=True)
        loader.start()
        if not load_in_background:
            loader.join()
        yield
        state.close()

    app = FastAPI(
        title="allinone",
        version=__version__,
        description="One small model, many tasks: OpenAI-compatible chat, constrained "
        "classification, health and readiness.",
        lifespan=lifespan,
        responses={
            400: {
                "description": "Bad input",
                "content": {
                    "application/json": {
                        "example": envelope(
                            "input is empty", "invalid_request_error", "invalid_request"
                        )
                    }
                },
            },
        },
    )
    app.state.server = state
    register_exception_handlers(app)
    app.include_router(health.router)
    app.include_router(openai.router)
    app.include_router(tasks.router)
    app.add_middleware(BodyLimitMiddleware, limit=settings.server.max_body_bytes)
    return app
