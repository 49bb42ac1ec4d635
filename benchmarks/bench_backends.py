"""Both CPU backends on the same texts in one run: llama.cpp (this engine) and transformers + torch
FP32 (the original design's stack), each with the same task (label scoring, cached prefix).

Each backend runs `allinone eval` in its own process, one text at a time; the parent samples the
child's resident memory and keeps the peak. Prints latency, accuracy and memory side by side.

    .venv/bin/python benchmarks/bench_backends.py --texts 200
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import psutil

from common import SHARED_DATA, machine, write_result

BACKENDS = ["llama_cpp", "transformers"]


def run(backend: str, texts: int, threads: int) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "allinone",
        "eval",
        "--json",
        "--backend",
        backend,
        "--threads",
        str(threads),
        "--batch",
        "1",
        "--limit",
        str(texts),
        "--no-calibration",
        "--task",
        "sentiment",
        str(SHARED_DATA / "chnsenticorp" / "test.tsv"),
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    peak = 0
    ps = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, ps.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.2)
    out = json.loads(proc.stdout.read())
    return {
        "backend": backend,
        "accuracy": out["accuracy"],
        "latency_ms": out["latency_ms"],
        "texts_per_s": out.get("texts_per_s"),
        "peak_rss_mb": round(peak / 2**20),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows = [run(b, args.texts, args.threads) for b in BACKENDS]
    print(f"{'backend':<14}{'accuracy':>9}{'p50 ms':>9}{'p95 ms':>9}{'peak RSS MB':>13}")
    for r in rows:
        lat = r["latency_ms"]
        print(
            f"{r['backend']:<14}{r['accuracy']:>9.3f}{lat['p50']:>9.0f}{lat['p95']:>9.0f}"
            f"{r['peak_rss_mb']:>13}"
        )
    a, b = rows
    print(
        f"llama_cpp vs transformers: {b['latency_ms']['p50'] / a['latency_ms']['p50']:.2f}x "
        f"faster (p50), {b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x less memory"
    )
    write_result("backends", {"machine": machine(), "texts": args.texts, "rows": rows})


if __name__ == "__main__":
    main()
