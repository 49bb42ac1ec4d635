"""The server's lifecycle: load the model (and the speech model) in the background, notice a
dead engine, record why the server cannot serve, and stop the engine at the end."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from allinone.backends.base import Backend
from allinone.cpu_budget import cpu_budget
from allinone.observability.metrics import Metrics
from allinone.service import TaskService
from allinone.settings import Settings
from allinone.speech.worker import SpeechWorker
from allinone.tasks import TaskRegistry

log = logging.getLogger(__name__)


@dataclass
class Lifecycle:
    """Loading -> ready -> (engine dead | closed); ``load`` runs in a background thread so
    /health answers at once. ``on_fatal`` is called with a message when the server cannot
    serve at all (the model failed to load, the engine died): ``allinone serve`` ends the
    process non-zero so a supervisor sees it and restarts or alerts."""

    settings: Settings
    tasks: TaskRegistry
    backend_factory: Callable[[], Backend]
    metrics: Metrics
    backend: Backend | None = None
    service: TaskService | None = None
    speech: SpeechWorker | None = None  # with --speech: the Whisper worker
    ready: threading.Event = field(default_factory=threading.Event)
    load_error: str | None = None
    started_at: float = field(default_factory=time.time)
    load_seconds: float | None = None
    on_fatal: Callable[[str], None] | None = None
    fatal_error: str | None = None
    engine_dead: bool = False

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

    def close(self) -> None:
        """Stop the engine."""
        self.ready.clear()
        self.metrics.ready.set(0)
        if self.speech is not None:
            self.speech.close()
        if self.backend is not None:
            self.backend.close()
