"""``create_app``: the FastAPI application with its routes, limits and error handling."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from allinone import __version__
from allinone.api.middleware import BodyLimitMiddleware, MetricsMiddleware
from allinone.api.routes import audio, completions, decisions, health, openai, tasks, ui
from allinone.api.state import ServerState
from allinone.backends.base import Backend
from allinone.errors import AuthenticationError, envelope, register_exception_handlers
from allinone.settings import Settings
from allinone.tasks import TaskRegistry


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
        state.bind_loop()
        if state.sampler is not None:
            state.sampler.start()
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

    async def require_api_key(request: Request) -> None:
        """With API keys configured, /v1 routes need ``Authorization: Bearer <key>``."""
        if not state.api_keys:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, key = auth.partition(" ")
        if scheme.lower() != "bearer" or key.strip() not in state.api_keys:
            state.metrics.rejected.labels("auth").inc()
            raise AuthenticationError(
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                headers={"WWW-Authenticate": "Bearer"},
            )

    app.include_router(health.router)
    app.include_router(ui.router)
    app.mount("/ui/assets", StaticFiles(directory=ui.UI_DIR), name="ui-assets")
    app.include_router(openai.router, dependencies=[Depends(require_api_key)])
    app.include_router(completions.router, dependencies=[Depends(require_api_key)])
    app.include_router(tasks.router, dependencies=[Depends(require_api_key)])
    app.include_router(decisions.router, dependencies=[Depends(require_api_key)])
    app.include_router(audio.router, dependencies=[Depends(require_api_key)])
    audio_limit = int(settings.speech.speech_max_upload_mb * 1024 * 1024)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.server.max_body_bytes,
        prefix_limits=(("/v1/audio/", audio_limit, "ALLINONE_SPEECH_MAX_UPLOAD_MB"),),
    )
    app.add_middleware(MetricsMiddleware, metrics=state.metrics)
    server = settings.server
    if server.cors_origins:
        # Outermost, so a browser's preflight (OPTIONS, no API key) is answered before the
        # key check, and every answer, errors included, carries the CORS headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.cors_origins,
            allow_methods=server.cors_methods,
            allow_headers=server.cors_headers,
            allow_credentials=server.cors_credentials,
            max_age=600,
        )
    return app
