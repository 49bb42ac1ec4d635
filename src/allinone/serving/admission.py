"""Admission: whether a request may start (ready, not draining, under the memory soft limit,
engine alive) and how long it may run (the request timeout, the drain deadline, the client's
connection)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

from allinone.errors import (
    ClientClosedError,
    GatewayTimeoutError,
    NotEnabledError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from allinone.observability.memory import MemorySampler
from allinone.observability.metrics import Metrics
from allinone.service import TaskService
from allinone.serving.lifecycle import Lifecycle
from allinone.settings import Settings
from allinone.speech.worker import SpeechWorker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Admission:
    """Refuses work the server cannot take (503 with Retry-After) and bounds the work it
    takes. ``sampler``: the memory sampler whose soft limit sheds load."""

    settings: Settings
    lifecycle: Lifecycle
    metrics: Metrics
    sampler: MemorySampler | None = None
    draining: bool = False
    loop: asyncio.AbstractEventLoop | None = None
    drain_deadline: asyncio.Event | None = None  # set when the drain's time is up

    def bind_loop(self) -> None:
        """Remember the serving event loop (called from the app's lifespan)."""
        self.loop = asyncio.get_running_loop()
        self.drain_deadline = asyncio.Event()

    def begin_drain(self) -> None:
        """Refuse new work now; in ``drain_timeout_s`` end whatever still runs, cleanly (a 503
        ``shutting_down`` envelope, or a stream's final error event and ``[DONE]``). Safe to call
        from a signal handler or another thread."""
        if self.draining:
            return
        self.draining = True
        timeout = self.settings.server.drain_timeout_s
        log.info("draining: new requests get 503; running ones have %.0f s", timeout)
        if self.loop is not None and self.drain_deadline is not None:
            deadline = self.drain_deadline
            self.loop.call_soon_threadsafe(self.loop.call_later, timeout, deadline.set)

    def _ended_early(self, what: str, timed_out: bool) -> Exception:
        if not timed_out:
            return ShuttingDownError(
                f"the server shut down before {what} finished (its drain deadline passed); "
                "retry on another instance",
                headers=self.retry_after(),
            )
        timeout = self.settings.server.request_timeout_s
        return GatewayTimeoutError(
            f"{what} took longer than {timeout:g} s (ALLINONE_REQUEST_TIMEOUT_S)"
        )

    async def bounded(
        self,
        work: Awaitable[T],
        what: str,
        deadline: float | None = None,
        request: Any = None,
    ) -> T:
        """Await ``work`` until it finishes, or until the first of: the request timeout (or the
        monotonic ``deadline``) -> GatewayTimeoutError (504); the drain deadline ->
        ShuttingDownError (503); the client of ``request`` (a Starlette request whose body was
        read) hanging up -> ClientClosedError (499). In each case ``work`` is cancelled, and its
        cleanup cancels the engine work, which leaves at the engine's next step (vLLM's
        ``with_cancellation`` does the same for every route)."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.server.request_timeout_s
        task = asyncio.ensure_future(work)
        drain = hangup = None
        waiters: set[asyncio.Future] = {task}
        if self.drain_deadline is not None:
            drain = asyncio.ensure_future(self.drain_deadline.wait())
            waiters.add(drain)
        if request is not None:
            hangup = asyncio.ensure_future(_until_disconnect(request))
            waiters.add(hangup)
        try:
            done, _ = await asyncio.wait(
                waiters,
                timeout=max(0.0, deadline - time.monotonic()),
                return_when=asyncio.FIRST_COMPLETED,
            )
            if task in done:
                return task.result()
            if hangup is not None and hangup in done:
                raise ClientClosedError(f"the client closed the connection before {what} ended")
            raise self._ended_early(what, timed_out=drain not in done)
        finally:
            for fut in (task, drain, hangup):
                if fut is not None and not fut.done():
                    fut.cancel()
            await asyncio.gather(*(f for f in (task, drain, hangup) if f), return_exceptions=True)

    async def bounded_iter(
        self, events: AsyncIterator[T], what: str, deadline: float | None = None
    ) -> AsyncIterator[T]:
        """``events`` item by item, each wait bounded as in :meth:`bounded` (one deadline for
        the whole iteration). One drain waiter serves the whole stream, not one per item."""
        if deadline is None:
            deadline = time.monotonic() + self.settings.server.request_timeout_s
        drain = None
        if self.drain_deadline is not None:
            drain = asyncio.ensure_future(self.drain_deadline.wait())
        try:
            while True:
                step: asyncio.Future = asyncio.ensure_future(anext(events))
                waiters: set[asyncio.Future] = {step} if drain is None else {step, drain}
                try:
                    done, _ = await asyncio.wait(
                        waiters,
                        timeout=max(0.0, deadline - time.monotonic()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    if not step.done():
                        step.cancel()
                        await asyncio.gather(step, return_exceptions=True)
                if step not in done:
                    raise self._ended_early(what, timed_out=drain is None or drain not in done)
                try:
                    item = step.result()
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if drain is not None and not drain.done():
                drain.cancel()
                await asyncio.gather(drain, return_exceptions=True)

    def retry_after(self) -> dict[str, str]:
        """The Retry-After header for refusals."""
        return {"Retry-After": str(self.settings.server.retry_after_s)}

    def require_service(self, count: bool = True) -> TaskService:
        """The task service, or 503 while loading, draining, over the memory soft limit, or
        with a dead engine. ``count``: record a refusal in the metrics (probes do not)."""
        if self.lifecycle.engine_dead:
            raise NotReadyError(
                f"{self.lifecycle.fatal_error}; the server is restarting, retry shortly",
                code="engine_dead",
                headers=self.retry_after(),
            )
        if self.draining:
            if count:
                self.metrics.rejected.labels("draining").inc()
            raise NotReadyError(
                "the server is shutting down; retry on another instance",
                code="draining",
                headers=self.retry_after(),
            )
        if self.sampler is not None and self.sampler.over_soft:
            if count:
                self.metrics.rejected.labels("memory").inc()
            raise OverloadedError(
                "the server is over its memory soft limit; retry later",
                code="memory_pressure",
                headers=self.retry_after(),
            )
        if not self.lifecycle.ready.is_set() or self.lifecycle.service is None:
            if self.lifecycle.load_error:
                raise NotReadyError(f"the model failed to load: {self.lifecycle.load_error}")
            raise NotReadyError(
                "the model is still loading; retry shortly", headers={"Retry-After": "1"}
            )
        return self.lifecycle.service

    def require_speech(self) -> SpeechWorker:
        """The speech worker, or: 501 ``not_enabled`` when the server runs without one, or the
        503s of :meth:`require_service`."""
        if not self.settings.speech.speech:
            raise NotEnabledError(
                "this server was started without a speech model: start it with --speech "
                "(ALLINONE_SPEECH=true) to serve audio routes"
            )
        self.require_service()
        assert self.lifecycle.speech is not None
        return self.lifecycle.speech


async def _until_disconnect(request: Any) -> None:
    """Return when the client hangs up. The route has read the body, so the next ASGI message
    can only be ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
