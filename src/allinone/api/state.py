"""What the running server holds: settings, the task service, and whether the model is ready."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Request

from allinone.backends.base import Backend
from allinone.cpu_budget import cpu_budget
from allinone.errors import (
    ClientClosedError,
    GatewayTimeoutError,
    NotEnabledError,
    NotReadyError,
    OverloadedError,
    ShuttingDownError,
)
from allinone.observability.history import HealthHistory
from allinone.observability.memory import MemorySample, MemorySampler, fix_mmap_threshold
from allinone.observability.metrics import Metrics
from allinone.service import TaskService
from allinone.settings import Settings
from allinone.speech.worker import SpeechWorker
from allinone.tasks import TaskRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ServerState:
    """Shared by all routes; the model loads in a background thread so /health answers at once."""

    settings: Settings
    tasks: TaskRegistry
    backend_factory: Callable[[], Backend]
    backend: Backend | None = None
    service: TaskService | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    load_seconds: float | None = None
    metrics: Metrics = field(default_factory=Metrics)
    sampler: MemorySampler | None = None
    history: HealthHistory | None = None
    draining: bool = False
    api_keys: set[str] = field(default_factory=set)
    loop: asyncio.AbstractEventLoop | None = None
    # Called with a message when the server cannot serve at all (the model failed to load):
    # `allinone serve` ends the process non-zero so a supervisor sees it and restarts or alerts.
    on_fatal: Callable[[str], None] | None = None
    fatal_error: str | None = None
    engine_dead: bool = False
    drain_deadline: asyncio.Event | None = None  # set when the drain's time is up
    speech: SpeechWorker | None = None  # with --speech: the Whisper worker

    def __post_init__(self) -> None:
        srv = self.settings.server
        self.api_keys = srv.all_api_keys()
        mb = 1024 * 1024
        if fix_mmap_threshold(srv.malloc_mmap_threshold_kb * 1024):
            log.info("malloc: blocks >= %d KiB are mmapped", srv.malloc_mmap_threshold_kb)
        engine_stats = self.engine_stats
        history = HealthHistory(
            engine_stats, self.metrics.api_requests_total, interval_s=srv.memory_sample_s
        )
        self.history = history

        def on_sample(sample: MemorySample) -> None:
            self.metrics.record_memory(sample)
            history.record(sample)

        self.sampler = MemorySampler(
            interval_s=srv.memory_sample_s,
            soft_limit_bytes=srv.memory_soft_limit_mb * mb if srv.memory_soft_limit_mb else None,
            hard_limit_bytes=srv.memory_hard_limit_mb * mb if srv.memory_hard_limit_mb else None,
            on_sample=on_sample,
        )
        self.metrics.watch_engine(engine_stats)

    def engine_stats(self) -> dict:
        """The engine's counters, with the speech worker's when it runs."""
        stats = dict(self.backend.stats()) if self.backend else {}
        if self.speech is not None:
            stats.update(self.speech.stats())
        return stats

    def load(self) -> None:
        """Build and load the backend (and the speech model, when enabled); records the error
        instead of raising."""
        t0 = time.perf_counter()
        try:
            backend = self.backend_factory()
            backend.load()
            if self.settings.speech.speech:
                self.speech = self._load_speech(lambda: backend.stats().get("queue_depth", 0))
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
            self.fatal(f"the model failed to load: {self.load_error}")
            return
        from allinone.runtime import decision_strategy_for

        self.backend = backend
        self.service = TaskService(
            backend,
            self.tasks,
            default_max_tokens=self.settings.server.default_max_tokens,
            decision_strategy=decision_strategy_for(self.settings),
        )
        calibrated = self.service.load_calibrations(self.settings.model.cache_dir)
        if calibrated:
            log.info("calibrated tasks: %s", ", ".join(calibrated))
        self.load_seconds = time.perf_counter() - t0
        self.metrics.load_seconds.set(self.load_seconds)
        self.metrics.ready.set(1)
        self.ready.set()
        budget = cpu_budget()
        log.info(
            "ready: model %s loaded in %.2f s; %d threads (the default would be %d: %s)",
            backend.model_id,
            self.load_seconds,
            self.settings.engine.threads,
            budget.count,
            budget.source,
        )
        threading.Thread(target=self._watch, name="allinone-watchdog", daemon=True).start()

    def _load_speech(self, llm_waiting: Callable[[], int]) -> SpeechWorker:
        """Load the speech model (see runtime.make_transcriber) and start its worker."""
        from allinone.runtime import make_transcriber

        transcriber = make_transcriber(self.settings)
        log.info("speech model %s loaded", transcriber.name)
        return SpeechWorker(
            transcriber, self.settings.engine.max_queue, self.metrics, other_waiting=llm_waiting
        )

    def require_speech(self) -> SpeechWorker:
        """The speech worker, or: 501 ``not_enabled`` when the server runs without one, or the
        503s of :meth:`require_service`."""
        if not self.settings.speech.speech:
            raise NotEnabledError(
                "this server was started without a speech model: start it with --speech "
                "(ALLINONE_SPEECH=true) to serve audio routes"
            )
        self.require_service()
        assert self.speech is not None
        return self.speech

    def _watch(self, every_s: float = 0.25) -> None:
        """Notice a dead engine (vLLM's ``terminate_if_errored``): /health turns 503, requests
        get 503 ``engine_dead``, and ``on_fatal`` ends the process so a supervisor restarts it."""
        while self.ready.is_set() and self.backend is not None:
            if not self.backend.health():
                if not self.ready.is_set():
                    return  # closed on purpose
                crash = self.backend.failure()
                self.engine_dead = True
                self.fatal(f"the engine stopped: {crash or 'its loop is no longer running'}")
                return
            time.sleep(every_s)

    def fatal(self, message: str) -> None:
        """Record why the server cannot serve and hand it to ``on_fatal`` (if any)."""
        self.fatal_error = message
        if self.on_fatal is not None and self.settings.server.exit_on_fatal:
            self.on_fatal(message)

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
        if self.engine_dead:
            raise NotReadyError(
                f"{self.fatal_error}; the server is restarting, retry shortly",
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
        if not self.ready.is_set() or self.service is None:
            if self.load_error:
                raise NotReadyError(f"the model failed to load: {self.load_error}")
            raise NotReadyError(
                "the model is still loading; retry shortly", headers={"Retry-After": "1"}
            )
        return self.service

    def close(self) -> None:
        """Stop the engine."""
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.sampler is not None:
            self.sampler.stop()
        if self.speech is not None:
            self.speech.close()
        if self.backend is not None:
            self.backend.close()


async def _until_disconnect(request: Any) -> None:
    """Return when the client hangs up. The route has read the body, so the next ASGI message
    can only be ``http.disconnect``."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def server_state(request: Request) -> ServerState:
    """The app's ServerState (a FastAPI dependency)."""
    state: ServerState = request.app.state.server
    return state


Server = Annotated[ServerState, Depends(server_state)]
"""A route parameter typed ``Server`` receives the app's ServerState."""
