"""ASGI middleware: API keys, request-body cap, per-request metrics and security headers."""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable, Collection, Container

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allinone.api.dialects import dialect_for
from allinone.errors import AuthenticationError, PayloadTooLargeError


def _route_path(scope: Scope) -> str:
    """The path routing sees (without the ASGI ``root_path``), as Starlette's router takes it."""
    path: str = scope["path"]
    root = scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root) : len(root) + 1] in ("", "/"):
        return path[len(root) :] or "/"
    return path


class APIKeyMiddleware:
    """With API keys configured, every request needs ``Authorization: Bearer <key>`` (or
    Anthropic's ``x-api-key: <key>``) except the
    ``public_paths`` (exact) and ``public_prefixes`` (probes, metrics, the page, the docs): 401
    ``authentication_error`` with ``WWW-Authenticate: Bearer``, in the route family's envelope
    (``allinone.api.dialects``), before a byte of the body is read, so a request without a key
    learns nothing about its body and cannot make the server wait for or hold one.

    Protection is by exclusion: a route added later needs a key unless made public here, and an
    unknown path answers 401, not 404, to a client without a key. ``keys`` is read at each
    request (the server's set); ``on_reject`` counts refusals."""

    def __init__(
        self,
        app: ASGIApp,
        keys: Collection[str],
        public_paths: Collection[str],
        public_prefixes: tuple[str, ...] = (),
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.public_paths = frozenset(public_paths)
        self.public_prefixes = public_prefixes
        self.on_reject = on_reject

    def _authorized(self, scope: Scope) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, bearer = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = bearer.strip()
                    break
            elif name == b"x-api-key":  # Anthropic's header (its SDKs and Claude-style tools)
                given = value.strip()
                break
        if not given:
            return False
        # Compare with every key in constant time: how far a guess matched leaks nothing.
        matched = False
        for k in self.keys:
            matched |= hmac.compare_digest(given, k.encode("utf-8"))
        return matched

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys:
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        # "/health/" too: the router redirects it to "/health"
        public = (path.rstrip("/") or "/") in self.public_paths
        if public or path.startswith(self.public_prefixes) or self._authorized(scope):
            await self.app(scope, receive, send)
            return
        if self.on_reject is not None:
            self.on_reject()
        err = AuthenticationError(
            "missing or wrong API key: send the header 'Authorization: Bearer <key>' "
            "(or 'x-api-key: <key>')",
            # close: the body is never read, and a connection kept open would make the server
            # read and drop whatever the client goes on sending
            headers={"WWW-Authenticate": "Bearer", "Connection": "close"},
        )
        await dialect_for(scope).response(err)(scope, receive, send)


class BodyLimitMiddleware:
    """Reads at most ``limit`` bytes of a request body; more is answered 413 before any route.
    ``prefix_limits``: (path prefix, limit, setting name) for routes with a limit of their own
    (audio uploads).

    The body is read up front and replayed, so routes never see a partial body and chunked
    uploads cannot slip past a Content-Length check."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int,
        prefix_limits: tuple[tuple[str, int, str], ...] = (),
    ) -> None:
        self.app = app
        self.limit = limit
        self.prefix_limits = prefix_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit, setting = self.limit, "ALLINONE_MAX_BODY_BYTES"
        for prefix, prefix_limit, prefix_setting in self.prefix_limits:
            if scope["path"].startswith(prefix):
                limit, setting = prefix_limit, prefix_setting
        too_big = PayloadTooLargeError(
            f"the request body is over {limit} bytes ({setting}); send less",
            headers={"Connection": "close"},  # the rest of the body is never read (as a 401)
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await dialect_for(scope).response(too_big)(scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > limit:
                await dialect_for(scope).response(too_big)(scope, receive, send)
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


class MetricsMiddleware:
    """Counts requests by route, task and status; times them; tracks in-flight.

    Every label value comes from a bounded set the server knows, never from the request (each
    distinct value is a time series kept for the life of the process, and /metrics is public):

    - ``route``: the matched route's template; for a request answered before routing (401, 413)
      its path when that is one of ``route_paths``, or the prefix in ``route_prefixes`` it falls
      under; else ``unmatched``;
    - ``task``: a task of ``tasks`` (the server's registry) or one of ``TASK_LABELS``; any other
      name a client sent is ``unknown``;
    - ``status``: the status answered; ``499`` when the client left before any answer."""

    # "model": the raw model (no task); "": routes without a task.
    TASK_LABELS = frozenset({"model", ""})

    def __init__(
        self,
        app: ASGIApp,
        metrics,
        tasks: Container[str] = (),
        route_paths: Collection[str] = (),
        route_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tasks = tasks
        self.route_paths = frozenset(route_paths)
        self.route_prefixes = route_prefixes

    def _route(self, scope: Scope, path: str) -> str:
        route = getattr(scope.get("route"), "path", None)
        if isinstance(route, str):
            return route  # a template the app defines ("/v1/models/{model}"), not the path
        if path in self.route_paths:
            return path
        for prefix in self.route_prefixes:
            if path.startswith(prefix + "/"):
                return prefix
        return "unmatched"

    def _task(self, scope: Scope) -> str:
        task = scope.get("state", {}).get("task", "")
        if not isinstance(task, str):
            return "unknown"
        if task in self.TASK_LABELS or task in self.tasks:
            return task
        return "unknown"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)  # now: a mount moves its prefix into scope["root_path"]
        status = 500  # an exception escaped: Starlette's outermost handler answers 500
        answered = False
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status, answered = message["status"], True
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
            if not answered:
                status = 499  # nginx's "client closed request": nobody was left to answer
        finally:
            self.metrics.inflight.dec()
            route, task = self._route(scope, path), self._task(scope)
            self.metrics.requests.labels(route, task, str(status)).inc()
            self.metrics.latency.labels(route, task).observe(time.perf_counter() - t0)


class SecurityHeadersMiddleware:
    """Adds ``X-Content-Type-Options: nosniff`` to every response, and to the web page and its
    assets (``page_paths`` exact, ``page_prefixes``) ``headers_for_page``: a Content-Security-
    Policy, framing and referrer protection. Outermost, so CORS preflights and errors get them
    too."""

    def __init__(
        self,
        app: ASGIApp,
        page_paths: Collection[str],
        page_prefixes: tuple[str, ...],
        headers_for_page: dict[str, str],
    ) -> None:
        self.app = app
        self.page_paths = frozenset(page_paths)
        self.page_prefixes = page_prefixes
        always = [(b"x-content-type-options", b"nosniff")]
        page = always + [
            (k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers_for_page.items()
        ]
        # (headers to add, their names: the same headers the app set are replaced)
        self.always = (always, frozenset(k for k, _ in always))
        self.page = (page, frozenset(k for k, _ in page))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = _route_path(scope)
        is_page = path in self.page_paths or path.startswith(self.page_prefixes)
        extra, names = self.page if is_page else self.always

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": headers + extra}
            await send(message)

        await self.app(scope, receive, send_wrapper)
