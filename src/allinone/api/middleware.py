"""ASGI middleware: request-body cap and per-request metrics."""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allinone.errors import PayloadTooLargeError, error_response


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
            f"the request body is over {limit} bytes ({setting}); send less"
        )
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
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
            if size > limit:
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


class MetricsMiddleware:
    """Counts requests by route template, task and status; times them; tracks in-flight."""

    def __init__(self, app: ASGIApp, metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        t0 = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.inflight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.inflight.dec()
            route = getattr(scope.get("route"), "path", "unmatched")
            task = scope.get("state", {}).get("task", "")
            self.metrics.requests.labels(route, task, str(status)).inc()
            self.metrics.latency.labels(route, task).observe(time.perf_counter() - t0)
