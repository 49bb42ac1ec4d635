"""`allinone soak`: drive a server with a realistic mix for N requests and prove memory is flat.

The mix: classification of fixed and varied-length texts (single and lists), chats plain and
streamed, and multi-turn chats whose history grows until the task's budget trims it. Memory is
read from the server process itself (/proc/<pid>/status when we started it, else /metrics) as
RSS and RssAnon + VmSwap. After a warm-up, a least-squares line gives the slope in MB per 10,000
requests, and the last quarter is compared with the first quarter after warm-up (plateau).
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import numpy as np

from allinone.observability.memory import read_memory

WORDS_ZH = [
    "服务",
    "房间",
    "价格",
    "味道",
    "速度",
    "质量",
    "环境",
    "态度",
    "包装",
    "物流",
    "非常",
    "有点",
    "完全",
    "还算",
    "真的",
    "好",
    "差",
    "满意",
    "失望",
    "推荐",
]
WORDS_EN = [
    "service",
    "room",
    "price",
    "taste",
    "speed",
    "quality",
    "staff",
    "very",
    "quite",
    "good",
    "bad",
    "great",
    "awful",
    "love",
    "hate",
    "recommend",
    "never",
    "again",
]


@dataclass
class SoakConfig:
    """What to run."""

    requests: int = 1000
    concurrency: int = 4
    warmup_fraction: float = 0.2
    sample_every: int = 20
    classify_task: str = "sentiment"
    chat_task: str = "chat"
    model_id: str | None = None
    max_tokens: int = 24
    max_words: int = 200  # longest random text sent for classification
    max_history: int = 40  # messages a conversation grows to before it starts over
    seed: int = 0
    api_key: str | None = None
    timeout_s: float = 300.0
    max_seconds: float | None = None  # stop issuing requests after this long (None: never)


@dataclass
class SoakReport:
    """The result: samples, fit, verdict."""

    requests: int
    concurrency: int
    seconds: float
    by_status: dict[str, int]
    errors: list[str]
    samples: list[dict] = field(default_factory=list)
    warmup_requests: int = 0
    slope_mb_per_10k: float = 0.0
    slope_rss_mb_per_10k: float = 0.0
    growth_after_warmup_mb: float = 0.0
    plateau: bool = True
    completed: int = 0  # requests actually sent (fewer than `requests` if the budget ran out)
    stopped_early: str | None = None  # why the soak ended before `requests`, if it did
    # the `allinone serve` flags of the server the soak started (None: it drove one at --url)
    server_flags: list[str] | None = None

    def to_dict(self) -> dict:
        """JSON shape of the report."""
        return asdict(self)


class MemoryProbe:
    """Reads the server's memory: from /proc when we know its pid, else from /metrics."""

    def __init__(self, url: str, pid: int | None, client: httpx.Client) -> None:
        self.url, self.pid, self.client = url, pid, client

    def _metrics(self) -> dict[str, float]:
        values = {}
        for line in self.client.get(f"{self.url}/metrics").text.splitlines():
            if line.startswith("allinone_") and " " in line and "{" not in line:
                name, _, value = line.partition(" ")
                try:
                    values[name] = float(value)
                except ValueError:
                    continue
        return values

    def read(self) -> dict[str, int]:
        """``rss`` and ``anon_plus_swap`` in bytes, and ``prompt_cache_bytes`` (the engine's
        saved sequence states, from /metrics) when the server reports it."""
        try:
            values = self._metrics()
        except httpx.HTTPError:
            values = {}
        out: dict[str, int] = {}
        if self.pid is not None:
            s = read_memory(self.pid)
            out["rss"], out["anon_plus_swap"] = s.rss, s.anon_plus_swap
        else:
            out["rss"] = int(values.get("allinone_memory_rss_bytes", 0))
            out["anon_plus_swap"] = int(values.get("allinone_memory_anon_plus_swap_bytes", 0))
        if "allinone_engine_prompt_cache_bytes" in values:
            out["prompt_cache_bytes"] = int(values["allinone_engine_prompt_cache_bytes"])
        return out


def _text(rng: random.Random, words: list[str], lo: int, hi: int) -> str:
    sep = "" if words is WORDS_ZH else " "
    return sep.join(rng.choice(words) for _ in range(rng.randint(lo, hi)))


class Driver:
    """Sends the request mix; one conversation per worker thread."""

    def __init__(self, url: str, cfg: SoakConfig, headers: dict[str, str]) -> None:
        self.url, self.cfg, self.headers = url, cfg, headers
        self.local = threading.local()

    def _client(self) -> httpx.Client:
        if not hasattr(self.local, "client"):
            self.local.client = httpx.Client(timeout=self.cfg.timeout_s, headers=self.headers)
            self.local.history = []
        return self.local.client

    def one(self, i: int) -> str:
        """Send request number ``i``; returns its status (or the error's name)."""
        rng = random.Random(self.cfg.seed * 1_000_003 + i)
        client = self._client()
        words = WORDS_ZH if self.cfg.classify_task == "sentiment" else WORDS_EN
        kind = i % 6
        try:
            if kind == 0:  # fixed text
                r = client.post(
                    f"{self.url}/v1/classify",
                    json={"task": self.cfg.classify_task, "input": "服务很好"},
                )
            elif kind == 1:  # varied lengths, as a list
                texts = [_text(rng, words, 1, self.cfg.max_words) for _ in range(rng.randint(1, 4))]
                r = client.post(
                    f"{self.url}/v1/classify", json={"task": self.cfg.classify_task, "input": texts}
                )
            elif kind in (2, 3):  # multi-turn chat with growing history, plain or streamed
                hist = self.local.history
                if len(hist) > self.cfg.max_history:
                    hist.clear()
                hist.append({"role": "user", "content": _text(rng, words, 2, 60)})
                body = {
                    "model": self.cfg.chat_task,
                    "messages": hist,
                    "max_tokens": self.cfg.max_tokens,
                    "stream": kind == 3,
                }
                if kind == 2:
                    r = client.post(f"{self.url}/v1/chat/completions", json=body)
                    if r.status_code == 200:
                        hist.append(r.json()["choices"][0]["message"])
                else:
                    with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                        parts = []
                        for line in r.iter_lines():
                            if line.startswith("data: {"):
                                for ch in json.loads(line[6:]).get("choices", []):
                                    parts.append(ch.get("delta", {}).get("content") or "")
                    if r.status_code == 200:
                        hist.append({"role": "assistant", "content": "".join(parts)})
            elif kind == 4:  # one-shot chat with the raw model, fresh each time
                model = self.cfg.model_id or self.cfg.chat_task
                r = client.post(
                    f"{self.url}/v1/chat/completions",
                    json={
                        "model": model,
                        "max_tokens": self.cfg.max_tokens,
                        "messages": [{"role": "user", "content": _text(rng, words, 1, 30)}],
                    },
                )
            else:  # a stream the client abandons early
                with client.stream(
                    "POST",
                    f"{self.url}/v1/chat/completions",
                    json={
                        "model": self.cfg.chat_task,
                        "stream": True,
                        "max_tokens": 64,
                        "messages": [{"role": "user", "content": _text(rng, words, 2, 20)}],
                    },
                ) as r:
                    for n, _ in enumerate(r.iter_lines()):
                        if n > 2:
                            break
            return str(r.status_code)
        except httpx.HTTPError as exc:
            return type(exc).__name__


def fit(samples: list[dict], warmup: int) -> tuple[float, float, float, bool]:
    """(anon+swap slope, rss slope) in MB per 10k requests after warm-up, the growth from the
    first to the last quarter after warm-up (MB), and whether memory plateaued."""
    post = [s for s in samples if s["requests"] >= warmup]
    if len(post) < 4:
        return 0.0, 0.0, 0.0, True
    x = np.array([s["requests"] for s in post], dtype=float)
    anon = np.array([s["anon_plus_swap"] for s in post], dtype=float) / 1e6
    rss = np.array([s["rss"] for s in post], dtype=float) / 1e6
    slope = float(np.polyfit(x, anon, 1)[0] * 10_000)
    slope_rss = float(np.polyfit(x, rss, 1)[0] * 10_000)
    q = max(1, len(post) // 4)
    growth = float(anon[-q:].mean() - anon[:q].mean())
    # A plateau: the last quarter is not above the running maximum of the middle by > 1 MB.
    plateau = float(anon[-q:].max()) <= float(anon[: len(anon) - q].max()) + 1.0
    return slope, slope_rss, growth, plateau


def run_soak(
    url: str,
    cfg: SoakConfig,
    pid: int | None = None,
    progress: bool = True,
    checkpoint: Path | None = None,
) -> SoakReport:
    """Drive the server at ``url`` and sample its memory every ``sample_every`` requests.

    With ``checkpoint``, the samples and statuses so far are rewritten there every 25 samples,
    so a run that is stopped early still leaves its measurements."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    driver = Driver(url, cfg, headers)
    by_status: dict[str, int] = {}
    errors: list[str] = []
    samples: list[dict] = []
    lock = threading.Lock()
    done = 0
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.requests, unit="req", desc="soak")
    t0 = time.perf_counter()
    with httpx.Client(timeout=30, headers=headers) as mclient:
        probe = MemoryProbe(url, pid, mclient)
        samples.append({"requests": 0, "t": 0.0, **probe.read()})

        budget_end = t0 + cfg.max_seconds if cfg.max_seconds else None

        def task(i: int) -> None:
            nonlocal done
            if budget_end is not None and time.perf_counter() > budget_end:
                return  # over the time budget: the report says so
            status = driver.one(i)
            with lock:
                by_status[status] = by_status.get(status, 0) + 1
                failed = not status.isdigit() or status.startswith("5")
                if failed and len(errors) < 20:
                    errors.append(f"request {i}: {status}")
                done += 1
                n = done
            if bar is not None:
                bar.update(1)
            if n % cfg.sample_every == 0:
                reading = probe.read()
                with lock:
                    samples.append({"requests": n, "t": time.perf_counter() - t0, **reading})
                    if checkpoint is not None and len(samples) % 25 == 0:
                        partial = {"done": n, "by_status": by_status, "samples": samples}
                        checkpoint.write_text(json.dumps(partial))

        with ThreadPoolExecutor(cfg.concurrency) as pool:
            list(pool.map(task, range(cfg.requests)))
    if bar is not None:
        bar.close()
    samples.sort(key=lambda s: s["requests"])
    seconds = time.perf_counter() - t0
    stopped = None
    if done < cfg.requests:
        stopped = (
            f"the time budget of {cfg.max_seconds:g} s ran out after {done} of {cfg.requests} "
            f"requests ({done / seconds:.2f} requests/s on this host): it is slower than the "
            "budget assumes; lower --requests or --max-tokens/--max-words, or raise --max-seconds"
        )
    warmup = int(cfg.requests * cfg.warmup_fraction)
    slope, slope_rss, growth, plateau = fit(samples, warmup)
    return SoakReport(
        requests=cfg.requests,
        concurrency=cfg.concurrency,
        seconds=round(seconds, 1),
        by_status=by_status,
        errors=errors,
        samples=samples,
        warmup_requests=warmup,
        slope_mb_per_10k=round(slope, 3),
        slope_rss_mb_per_10k=round(slope_rss, 3),
        growth_after_warmup_mb=round(growth, 3),
        plateau=plateau,
        completed=done,
        stopped_early=stopped,
    )


def plot(report: SoakReport, path: Path, title: str = "") -> Path:
    """Memory against requests, warm-up shaded, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [s["requests"] for s in report.samples]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    ax.plot(x, [s["rss"] / 1e6 for s in report.samples], label="RSS")
    ax.plot(x, [s["anon_plus_swap"] / 1e6 for s in report.samples], label="RssAnon + VmSwap")
    if any("prompt_cache_bytes" in s for s in report.samples):
        ax.plot(
            x,
            [s.get("prompt_cache_bytes", 0) / 1e6 for s in report.samples],
            label="prompt cache (saved sequence states)",
        )
    ax.axvspan(0, report.warmup_requests, color="grey", alpha=0.15, label="warm-up (discarded)")
    ax.set_xlabel("requests")
    ax.set_ylabel("MB")
    ax.set_title(
        title
        or f"soak: {report.requests} requests at concurrency {report.concurrency}; "
        f"slope {report.slope_mb_per_10k:+.2f} MB / 10k requests"
    )
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
