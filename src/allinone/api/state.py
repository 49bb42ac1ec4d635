"""What the running server holds: settings, the task service, and whether the model is ready."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from allinone.backends.base import Backend
from allinone.errors import NotReadyError, OverloadedError
from allinone.observability.memory import MemorySampler
from allinone.observability.metrics import Metrics
from allinone.service import TaskService
from allinone.settings import Settings
from allinone.tasks import TaskRegistry

log = logging.getLogger(__name__)


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
    draining: bool = False
    api_keys: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        srv = self.settings.server
        self.api_keys = srv.all_api_keys()
        mb = 1024 * 1024
        self.sampler = MemorySampler(
            interval_s=srv.memory_sample_s,
            soft_limit_bytes=srv.memory_soft_limit_mb * mb if srv.memory_soft_limit_mb else None,
            hard_limit_bytes=srv.memory_hard_limit_mb * mb if srv.memory_hard_limit_mb else None,
            on_sample=self.metrics.record_memory,
        )
        self.metrics.watch_engine(lambda: self.backend.stats() if self.backend else {})

    def load(self) -> None:
        """Build and load the backend; records the error instead of raising."""
        t0 = time.perf_counter()
        try:
            backend = self.backend_factory()
            backend.load()
        except Exception as exc:
            log.exception("model failed to load")
            self.load_error = f"{type(exc).__name__}: {exc}"
            return
        self.backend = backend
        self.service = TaskService(
            backend, self.tasks, default_max_tokens=self.settings.server.default_max_tokens
        )
        calibrated = self.service.load_calibrations(self.settings.model.cache_dir)
        if calibrated:
            log.info("calibrated tasks: %s", ", ".join(calibrated))
        self.load_seconds = time.perf_counter() - t0
        self.metrics.load_seconds.set(self.load_seconds)
        self.metrics.ready.set(1)
        self.ready.set()
        log.info("ready: model %s loaded in %.2f s", backend.model_id, self.load_seconds)

    def retry_after(self) -> dict[str, str]:
        """The Retry-After header for refusals."""
        return {"Retry-After": str(self.settings.server.retry_after_s)}

    def require_service(self) -> TaskService:
        """The task service, or 503 while loading, draining, or over the memory soft limit."""
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise NotReadyError(
                "the server is shutting down; retry on another instance",
                code="draining",
                headers=self.retry_after(),
            )
        if self.sampler is not None and self.sampler.over_soft:
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
        if self.backend is not None:
            self.backend.close()
