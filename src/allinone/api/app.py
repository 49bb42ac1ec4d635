"""``create_app``: the FastAPI application with its routes, limits and error handling."""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles

from allinone import __version__
from allinone.api.json_text import check_json_text
from allinone.api.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    MetricsMiddleware,
    SecurityHeadersMiddleware,
)
from allinone.api.routes import (
    audio,
    completions,
    decisions,
    health,
    messages,
    openai,
    responses,
    tasks,
    ui,
)
from allinone.api.state import ServerState
from allinone.backends.base import Backend
from allinone.errors import envelope, register_exception_handlers
from allinone.settings import Settings
from allinone.tasks import TaskRegistry

UI_ASSETS = "/ui/assets"
# The page's protection. Its scripts and styles are files under /ui/assets (no inline code; it
# sets styles through the CSSOM, which CSP allows); it talks only to this server; the favicon is
# a data: URL. No framing (clickjacking), no Referer leaking the page's address elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}


def _paths(*routers: APIRouter) -> set[str]:
    """The path templates of the routers' routes."""
    return {p for router in routers for r in router.routes if (p := getattr(r, "path", None))}


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
        state.admission.bind_loop()
        if state.sampler is not None:
            state.sampler.start()
        loader = threading.Thread(target=state.lifecycle.load, name="allinone-load", daemon=True)
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

    api_routers = (
        openai.router,
        completions.router,
        tasks.router,
        *decisions.routers,
        audio.router,
        responses.router,
        messages.router,
    )
    public_routers = (health.router, ui.router)
    for router in public_routers:
        app.include_router(router)
    app.mount(UI_ASSETS, StaticFiles(directory=ui.UI_DIR), name="ui-assets")
    for router in api_routers:
        # One text rule over every JSON body, before any route's own validation (json_text).
        app.include_router(router, dependencies=[Depends(check_json_text)])
    docs = {app.docs_url, app.redoc_url, app.openapi_url, app.swagger_ui_oauth2_redirect_url}
    docs_paths = {d for d in docs if d}

    # Middleware, innermost first (each add_middleware wraps the ones before it).
    audio_limit = int(settings.speech.speech_max_upload_mb * 1024 * 1024)
    app.add_middleware(
        BodyLimitMiddleware,
        limit=settings.server.max_body_bytes,
        prefix_limits=(("/v1/audio/", audio_limit, "ALLINONE_SPEECH_MAX_UPLOAD_MB"),),
    )
    # Outside the body cap: a request without a key is refused before a byte of its body is
    # read. Public: the probes, /metrics, the page and what it reads first, the API docs.
    app.add_middleware(
        APIKeyMiddleware,
        keys=state.api_keys,
        public_paths=_paths(*public_routers) | docs_paths,
        public_prefixes=(UI_ASSETS + "/",),
        on_reject=state.metrics.rejected.labels("auth").inc,
    )
    app.add_middleware(
        MetricsMiddleware,
        metrics=state.metrics,
        tasks=registry,
        route_paths=_paths(*public_routers, *api_routers) | docs_paths,
        route_prefixes=(UI_ASSETS,),
    )
    server = settings.server
    if server.cors_origins:
        # Outside the key check, so a browser's preflight (OPTIONS, no API key) is answered
        # before it, and every answer, errors included, carries the CORS headers.
        app.add_middleware(
            CORSMiddleware,
            allow_origins=server.cors_origins,
            allow_methods=server.cors_methods,
            allow_headers=server.cors_headers,
            allow_credentials=server.cors_credentials,
            # Chrome's Private Network Access: a page on a public site calling this server on a
            # private address first asks with Access-Control-Request-Private-Network. An origin
            # the operator listed may (it still needs a key when keys are set); others get 400.
            allow_private_network=server.cors_private_network,
            max_age=600,
        )
    app.add_middleware(
        SecurityHeadersMiddleware,
        page_paths={"/", "/ui"},
        page_prefixes=(UI_ASSETS + "/",),
        headers_for_page=PAGE_HEADERS,
    )
    return app
