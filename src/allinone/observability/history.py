"""The last hour of the server's health, kept in memory for the web page's live panel.

One point per memory sample (``memory_sample_s``, 10 s by default, so 360 points an hour):
RSS and RssAnon + VmSwap, the engine's queue depth and active sequences, and the rates of
generated tokens and API requests since the point before. A bounded deque: the history itself
cannot grow memory (a point is ~8 numbers).
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from allinone.observability.memory import MemorySample


@dataclass
class HealthPoint:
    """One point. ``t``: Unix seconds; memory in bytes; rates per second."""

    t: float
    rss: int
    anon_plus_swap: int
    queue_depth: int
    active: int
    tokens_per_s: float
    requests_per_s: float


class HealthHistory:
    """Points over the last ``window_s`` seconds, one each ``interval_s``.

    ``engine_stats``: the backend's ``stats()`` (``queue_depth``, ``active``,
    ``generated_tokens``; {} before the model is loaded); ``requests_total``: API requests
    answered so far. Thread-safe: the memory sampler's thread records, the event loop reads."""

    def __init__(
        self,
        engine_stats: Callable[[], dict],
        requests_total: Callable[[], float],
        window_s: float = 3600.0,
        interval_s: float = 10.0,
    ) -> None:
        self.window_s, self.interval_s = window_s, interval_s
        self._engine_stats, self._requests_total = engine_stats, requests_total
        self._points: deque[HealthPoint] = deque(maxlen=math.ceil(window_s / interval_s) + 1)
        self._last: tuple[float, float, float] | None = None  # (t, tokens, requests)
        self._lock = threading.Lock()

    def record(self, sample: MemorySample) -> None:
        """Add a point for ``sample``, with the engine's state read now."""
        stats = self._engine_stats() or {}
        tokens = float(stats.get("generated_tokens", 0))
        requests = float(self._requests_total())
        tok_rate = req_rate = 0.0
        if self._last is not None:
            t0, tok0, req0 = self._last
            dt = sample.t - t0
            if dt > 0:
                tok_rate = max(0.0, tokens - tok0) / dt
                req_rate = max(0.0, requests - req0) / dt
        self._last = (sample.t, tokens, requests)
        point = HealthPoint(
            t=round(sample.t, 3),
            rss=sample.rss,
            anon_plus_swap=sample.anon_plus_swap,
            queue_depth=int(stats.get("queue_depth", 0)),
            active=int(stats.get("active", 0)),
            tokens_per_s=round(tok_rate, 2),
            requests_per_s=round(req_rate, 3),
        )
        with self._lock:
            self._points.append(point)

    def to_dict(self) -> dict:
        """``{"interval_s", "window_s", "points": [HealthPoint as dict, oldest first]}``."""
        with self._lock:
            points = [asdict(p) for p in self._points]
        return {"interval_s": self.interval_s, "window_s": self.window_s, "points": points}
