"""Foundation figures on this machine: load time, resident memory, classification latency,
chat decode speed. Run: `.venv/bin/python benchmarks/bench_foundation.py [--texts 100]`."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.backends.base import GenerationParams
from allinone.backends.llama_cpp import LlamaCppBackend
from allinone.models import ensure_model
from allinone.service import TaskService
from allinone.settings import EngineSettings
from allinone.tasks import TaskRegistry
from common import SHARED_DATA, machine, pct, read_tsv, rss_mb, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="default")
    ap.add_argument("--texts", type=int, default=100, help="ChnSentiCorp test_clean texts")
    ap.add_argument("--chats", type=int, default=5, help="chat replies of --tokens tokens")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    path = ensure_model(args.model)
    rss0 = rss_mb()
    t0 = time.perf_counter()
    backend = LlamaCppBackend(path, EngineSettings(threads=args.threads), path.stem)
    backend.load()
    load_s = time.perf_counter() - t0
    rss_load = rss_mb()
    service = TaskService(backend, TaskRegistry.load())

    rows = read_tsv(SHARED_DATA / "chnsenticorp" / "test_clean.tsv", args.texts)
    task = service.tasks.get("sentiment")
    service.classify("sentiment", ["预热"])  # evaluates and caches the task prefix once
    lat, correct = [], 0
    for value, text in rows:  # one request at a time: the latency a single client sees
        t = time.perf_counter()
        (r,) = service.classify("sentiment", [text])
        lat.append((time.perf_counter() - t) * 1000)
        correct += r.label == task.label_for_value(value)

    prompt = backend.render_chat(
        [{"role": "user", "content": "请写一篇关于春天的长文章，至少五百字。"}], 0
    )
    rates, ttfts = [], []
    for _ in range(args.chats):
        h = backend.generate(
            prompt, GenerationParams(max_tokens=args.tokens, temperature=0.8, seed=len(rates))
        )
        t = time.perf_counter()
        first = None
        fin = None
        for kind, value in h.events():
            if kind == "text" and first is None:
                first = time.perf_counter()
            elif kind == "done":
                fin = value
        end = time.perf_counter()
        ttfts.append((first - t) * 1000)
        if fin.usage.completion_tokens > 1:
            rates.append((fin.usage.completion_tokens - 1) / (end - first))
    rss_end = rss_mb()
    backend.close()

    result = {
        "model": path.name,
        "threads": args.threads,
        "machine": machine(),
        "load_s": round(load_s, 3),
        "rss_before_load_mb": round(rss0, 1),
        "rss_after_load_mb": round(rss_load, 1),
        "rss_after_run_mb": round(rss_end, 1),
        "classify": {
            "texts": len(rows),
            "accuracy": round(correct / len(rows), 4),
            "latency_ms_p50": round(statistics.median(lat), 1),
            "latency_ms_p95": round(pct(lat, 95), 1),
        },
        "chat": {
            "replies": len(rates),
            "max_tokens": args.tokens,
            "decode_tokens_per_s": round(statistics.median(rates), 1),
            "ttft_ms_p50": round(statistics.median(ttfts), 1),
        },
    }
    out = write_result("foundation", result)
    print(f"model                 {result['model']} ({args.threads} threads)")
    print(f"load                  {load_s:.2f} s")
    print(f"resident after load   {rss_load:.0f} MB (process before load: {rss0:.0f} MB)")
    print(f"resident after run    {rss_end:.0f} MB")
    c = result["classify"]
    print(
        f"classify              p50 {c['latency_ms_p50']} ms, p95 {c['latency_ms_p95']} ms, "
        f"accuracy {c['accuracy']} on {c['texts']} test_clean texts"
    )
    ch = result["chat"]
    print(
        f"chat decode           {ch['decode_tokens_per_s']} tokens/s, "
        f"time to first token {ch['ttft_ms_p50']} ms"
    )
    print(f"saved                 {out}")


if __name__ == "__main__":
    main()
