"""What the running server holds: settings, tasks, metrics, and its two parts: the
lifecycle (``allinone.serving.lifecycle``: loading, the engine's health, closing) and admission
(``allinone.serving.admission``: whether a request may start and how long it may run)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from allinone.backends.base import Backend
from allinone.memory_budget import MemoryBudget, memory_budget
from allinone.observability.history import HealthHistory
from allinone.observability.memory import MemorySample, MemorySampler, fix_mmap_threshold
from allinone.observability.metrics import Metrics
from allinone.serving.admission import Admission
from allinone.serving.lifecycle import Lifecycle
from allinone.settings import Settings
from allinone.tasks import TaskRegistry

log = logging.getLogger(__name__)


@dataclass
class ServerState:
    """Shared by all routes (as the ``Server`` dependency)."""

    settings: Settings
    tasks: TaskRegistry
    backend_factory: Callable[[], Backend]
    metrics: Metrics = field(default_factory=Metrics)
    api_keys: set[str] = field(default_factory=set)
    sampler: MemorySampler | None = None
    history: HealthHistory | None = None
    memory_budget: MemoryBudget | None = None
    lifecycle: Lifecycle = field(init=False)
    admission: Admission = field(init=False)

    def __post_init__(self) -> None:
        srv = self.settings.server
        self.api_keys = srv.all_api_keys()
        budget = memory_budget(
            srv.memory_soft_limit_mb, srv.memory_hard_limit_mb, srv.memory_from_cgroup
        )
        self.memory_budget = budget
        if fix_mmap_threshold(srv.malloc_mmap_threshold_kb * 1024):
            log.info("malloc: blocks >= %d KiB are mmapped", srv.malloc_mmap_threshold_kb)
        self.lifecycle = Lifecycle(self.settings, self.tasks, self.backend_factory, self.metrics)
        engine_stats = self.lifecycle.engine_stats
        history = HealthHistory(
            engine_stats, self.metrics.api_requests_total, interval_s=srv.memory_sample_s
        )
        self.history = history

        def on_sample(sample: MemorySample) -> None:
            self.metrics.record_memory(sample)
            history.record(sample)

        self.sampler = MemorySampler(
            interval_s=srv.memory_sample_s,
            soft_limit_bytes=budget.soft_bytes,
            hard_limit_bytes=budget.hard_bytes,
            on_sample=on_sample,
            budget_source=budget.source,
        )
        self.metrics.watch_engine(engine_stats)
        self.admission = Admission(self.settings, self.lifecycle, self.metrics, self.sampler)

    def close(self) -> None:
        """Stop sampling memory, then the engine."""
        if self.sampler is not None:
            self.sampler.stop()
        self.lifecycle.close()


def server_state(request: Request) -> ServerState:
    """The app's ServerState (a FastAPI dependency)."""
    state: ServerState = request.app.state.server
    return state


Server = Annotated[ServerState, Depends(server_state)]
"""A route parameter typed ``Server`` receives the app's ServerState."""
