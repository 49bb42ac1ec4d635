"""The vLLM backend on this machine: load time, one greedy reply's decode speed, four replies
at once, and classification latency, for a model converted to a Hugging Face folder. Runs in
the vLLM venv that `make vllm-env` builds (docs/scale-out.md#vllm):

    ~/.cache/allinone/vllm-venv/bin/python benchmarks/bench_vllm.py --model default
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import time

from common import machine, write_result

PROMPT = "Write a long poem about spring."
TEXTS = ["这家酒店太差了，房间又脏又吵", "非常满意，服务很好，下次还来", "一般般吧，没什么特别的"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default", help="catalog name (converted) or HF folder")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--compile", action="store_true", help="torch.compile (CPU default: eager)")
    args = ap.parse_args()

    from pathlib import Path

    from allinone.backends.base import GenerationParams
    from allinone.backends.transformers_backend import hf_folder
    from allinone.backends.vllm_backend import VLLMBackend
    from allinone.models import ensure_model
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    folder = Path(args.model) if Path(args.model).is_dir() else hf_folder(ensure_model(args.model))
    extra = {"enforce_eager": False} if args.compile else {}
    backend = VLLMBackend(folder, EngineSettings(ctx_per_seq=1024, parallel=4), "m", extra)
    t = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - t
    try:
        prompt = backend.render_chat([{"role": "user", "content": PROMPT}], 0)
        params = GenerationParams(max_tokens=args.tokens)
        backend.generate(prompt, GenerationParams(max_tokens=8)).result(600)  # warm-up
        t = time.perf_counter()
        one = backend.generate(prompt, params).result(600)
        one_s = time.perf_counter() - t
        t = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            four = list(pool.map(lambda _: backend.generate(prompt, params).result(600), range(4)))
        four_s = time.perf_counter() - t
        service = TaskService(backend, TaskRegistry.load([]), 64)
        service.classify("sentiment", TEXTS[:1])
        t = time.perf_counter()
        labels = [r.label for r in service.classify("sentiment", TEXTS)]
        classify_s = time.perf_counter() - t
    finally:
        backend.close()
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": machine(),
        "model": folder.name,
        "mode": "torch.compile" if args.compile else "eager",
        "load_s": round(load_s, 1),
        "one_reply_tokens": one.usage.completion_tokens,
        "one_reply_tok_s": round(one.usage.completion_tokens / one_s, 1),
        "four_replies_tok_s": round(sum(f.usage.completion_tokens for f in four) / four_s, 1),
        "classify_3_texts_s": round(classify_s, 2),
        "labels": labels,
    }
    for k, v in result.items():
        print(f"{k}: {v}")
    write_result(f"vllm-{folder.name}-{result['mode']}", result)


if __name__ == "__main__":
    main()
