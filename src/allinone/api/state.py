"""What the running server holds: settings, the task service, and whether the model is ready."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from allinone.backends.base import Backend
from allinone.errors import NotReadyError
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
        self.ready.set()
        log.info("ready: model %s loaded in %.2f s", backend.model_id, self.load_seconds)

    def require_service(self) -> TaskService:
        """The task service, or NotReadyError (503) while loading or after a failed load."""
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
        if self.backend is not None:
            self.backend.close()
