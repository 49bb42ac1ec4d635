"""The web page's health history: rates from counter deltas, bounded to its window."""

from __future__ import annotations

from allinone.observability.history import HealthHistory
from allinone.observability.memory import MemorySample


def test_rates_come_from_the_counters_and_the_window_bounds_the_points():
    engine = {"queue_depth": 2, "active": 3, "generated_tokens": 0}
    requests = [0.0]
    h = HealthHistory(lambda: engine, lambda: requests[0], window_s=30, interval_s=10)
    for i in range(10):
        engine["generated_tokens"] = 50 * i  # 50 tokens and 2 requests a 10 s step
        requests[0] = 2.0 * i
        h.record(MemorySample(t=1000.0 + 10 * i, rss=100 + i, rss_anon=40, swap=2))
    points = h.to_dict()["points"]
    assert len(points) == 4  # 30 s of 10 s points, both ends included
    last = points[-1]
    assert last["tokens_per_s"] == 5.0 and last["requests_per_s"] == 0.2
    assert last["anon_plus_swap"] == 42 and last["rss"] == 109
    assert (last["queue_depth"], last["active"]) == (2, 3)
    assert [p["t"] for p in points] == [1060.0, 1070.0, 1080.0, 1090.0]


def test_before_the_model_loads_there_is_memory_and_no_engine():
    h = HealthHistory(dict, lambda: 0.0)
    h.record(MemorySample(t=1.0, rss=10, rss_anon=5, swap=0))
    (p,) = h.to_dict()["points"]
    assert (p["active"], p["tokens_per_s"], p["rss"]) == (0, 0.0, 10)
