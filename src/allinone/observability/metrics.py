"""Prometheus metrics, all named ``allinone_*``, in one registry per app."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# Real-time factor of a transcription (seconds of work per second of audio): measured 0.1-0.25
# for Whisper-base on 2 busy cores; above 1 is slower than real time.
RTF_BUCKETS = (0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5)


class EngineCollector:
    """Reads the engine's counters at scrape time (no bookkeeping on the hot path)."""

    def __init__(self, stats: Callable[[], dict]) -> None:
        self.stats = stats

    def collect(self):
        s = self.stats() or {}
        gauges = {
            "queue_depth": "Requests waiting for an engine sequence",
            "active": "Sequences being prefilled or decoded",
            "cached_prefixes": "Task prefixes held as shared KV-cache sequences",
            "prompt_cache_entries": "Finished chats kept in host memory",
            "prompt_cache_bytes": "Bytes of finished chats' KV cells kept in host memory",
        }
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"allinone_engine_{key}", doc, value=s.get(key, 0))
        counters = {
            "prompt_tokens": "Prompt tokens evaluated (cached prefix tokens excluded)",
            "generated_tokens": "Tokens generated",
            "steps": "llama_decode calls",
            "split_steps": "Steps run as two decodes (a big prompt chunk met generating sequences)",
            "prefix_hits": "Requests served from a cached task prefix",
            "prefix_misses": "Requests whose prefix had to be evaluated",
            "reused_tokens": "Prompt tokens kept from an earlier turn of the same chat",
            "restored_tokens": "Prompt tokens of those brought back from host memory",
            "prompt_cache_saves": "Finished chats copied to host memory",
            "finished": "Engine requests finished",
            "cancelled": "Engine requests cancelled (client gone, timeout)",
            "failed": "Engine requests failed",
        }
        for key, doc in counters.items():
            yield CounterMetricFamily(f"allinone_engine_{key}", doc, value=s.get(key, 0))


class Metrics:
    """Every metric the server exports. Every label value comes from a bounded set the server
    knows (route templates, its tasks, fixed reasons), never from a request: each distinct value
    is a series kept for the life of the process (api.middleware.MetricsMiddleware maps the
    request's route and task)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "allinone_requests",
            "HTTP requests by route template (unmatched: no route), task (unknown: a name the "
            "server does not know) and status (499: the client left before the answer)",
            ["route", "task", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "allinone_request_latency_seconds",
            "HTTP request latency by route and task",
            ["route", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inflight = Gauge(
            "allinone_inflight_requests", "HTTP requests being served", registry=r
        )
        self.rejected = Counter(
            "allinone_rejected_requests",
            "Requests refused before any work, by reason (queue_full, memory, draining, auth, "
            "header_limit, header_timeout, body_timeout, bad_http)",
            ["reason"],
            registry=r,
        )
        self.decisions = Counter(
            "allinone_decisions_total",
            "Decision requests answered, by route (decisions: OpenAI, systemone: TypeSafe)",
            ["route"],
            registry=r,
        )
        self.decision_questions = Counter(
            "allinone_decision_questions_total",
            "Questions answered in decision requests, by question type",
            ["type"],
            registry=r,
        )
        self.load_seconds = Gauge(
            "allinone_model_load_seconds", "Time to load the model", registry=r
        )
        self.ready = Gauge("allinone_ready", "1 when the model is loaded and serving", registry=r)
        self.rss = Gauge("allinone_memory_rss_bytes", "Resident memory (VmRSS)", registry=r)
        self.anon = Gauge(
            "allinone_memory_rss_anon_bytes", "Anonymous resident memory (RssAnon)", registry=r
        )
        self.swap = Gauge("allinone_memory_swap_bytes", "Swapped-out memory (VmSwap)", registry=r)
        self.anon_swap = Gauge(
            "allinone_memory_anon_plus_swap_bytes",
            "RssAnon + VmSwap: private memory, resident or not",
            registry=r,
        )

        self.audio_seconds = Counter(
            "allinone_audio_seconds",
            "Seconds of audio transcribed (finished transcriptions)",
            registry=r,
        )
        self.transcriptions = Counter(
            "allinone_transcriptions",
            "Transcriptions by outcome (ok, error, cancelled)",
            ["outcome"],
            registry=r,
        )
        self.transcription_rtf = Histogram(
            "allinone_transcription_rtf",
            "Real-time factor of finished transcriptions (work seconds / audio seconds)",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.speech_queue = Gauge(
            "allinone_speech_queue_depth",
            "Transcriptions waiting for the speech worker (the one running not counted)",
            registry=r,
        )

    def watch_engine(self, stats: Callable[[], dict]) -> None:
        """Export the engine's counters, read at scrape time."""
        self.registry.register(EngineCollector(stats))

    def api_requests_total(self) -> float:
        """API requests answered so far (routes under /v1/; probes and pages not counted)."""
        total = 0.0
        for family in self.requests.collect():
            for s in family.samples:
                if s.name.endswith("_total") and s.labels.get("route", "").startswith("/v1/"):
                    total += s.value
        return total

    def record_memory(self, sample) -> None:
        """Update the memory gauges from a MemorySample."""
        self.rss.set(sample.rss)
        self.anon.set(sample.rss_anon)
        self.swap.set(sample.swap)
        self.anon_swap.set(sample.anon_plus_swap)
