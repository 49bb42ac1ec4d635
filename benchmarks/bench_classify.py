"""Classification speed and memory, all methods on the same ChnSentiCorp test texts in one run.

Methods (each runs in its own process so resident memory is its own):
  ours                   label scoring after the task's cached prefix, one request at a time
  ours-bf16              the same on the catalog's fast-classify model (default weights in BF16)
  original-llama         the original method on our engine: full long instruction prompt per
                         request (no prefix cache), greedy generation of up to 12 tokens, parsed
  original-transformers  the original design as built: transformers + torch FP32, the default
                         GGUF dequantised, long prompt, generate(max_new_tokens=12)
  list32                 32 texts in one POST /v1/classify against 32 single calls (HTTP)

Run: `make bench-classify` (installs the torch extra) or
     `.venv/bin/python benchmarks/bench_classify.py [--texts 200] [--methods ours,original-llama]`
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, machine, read_tsv, rss_mb, write_result

LABELS = {"1": "正面", "0": "负面"}
# The original design's instruction prompt (about 137 prompt tokens per text with the template).
ORIGINAL_PROMPT = (
    "你是一个专业的中文情感分析助手。请仔细阅读下面这条用户评论，判断评论所表达的整体情感倾向。\n"
    "要求：\n"
    "1. 如果评论整体上表达了满意、喜欢、推荐、赞扬等积极的情绪，请回答“正面”；\n"
    "2. 如果评论整体上表达了不满、失望、抱怨、批评等消极的情绪，请回答“负面”；\n"
    "3. 只输出“正面”或“负面”两个字中的一个，不要输出任何解释、标点或其他内容。\n"
    "评论：{text}\n"
    "情感倾向："
)
METHODS = ["ours", "ours-bf16", "original-llama", "original-transformers", "list32"]


def parse_label(text: str) -> str | None:
    """The original design's answer parsing: the first label mentioned in the output."""
    hits = [(text.find(lab), lab) for lab in ("正面", "负面") if lab in text]
    return min(hits)[1] if hits else None


def summarise(name: str, lat: list[float], pred: list[str | None], gold: list[str], extra=None):
    correct = sum(p == g for p, g in zip(pred, gold, strict=True))
    out = {
        "method": name,
        "n": len(gold),
        "accuracy": round(correct / len(gold), 4),
        "unparsed": sum(p is None for p in pred),
        "latency_ms_p50": round(statistics.median(lat), 1),
        "latency_ms_mean": round(statistics.mean(lat), 1),
        "rss_mb_after": round(rss_mb(), 1),
    }
    out.update(extra or {})
    return out


def run_ours(rows, threads, model="default", name="ours"):
    from allinone.backends.llama_cpp import LlamaCppBackend
    from allinone.models import ensure_model
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    backend = LlamaCppBackend(ensure_model(model), EngineSettings(threads=threads), model)
    backend.load()
    service = TaskService(backend, TaskRegistry.load())
    service.classify("sentiment", ["预热"])  # caches the task prefix once
    lat, pred = [], []
    for _, text in rows:
        t = time.perf_counter()
        (r,) = service.classify("sentiment", [text])
        lat.append((time.perf_counter() - t) * 1000)
        pred.append(r.label)
    out = summarise(name, lat, pred, [LABELS[v] for v, _ in rows])
    backend.close()
    return out


def run_ours_bf16(rows, threads):
    """Ours on the catalog's fast-classify model: the default's weights widened to BF16."""
    return run_ours(rows, threads, model="fast-classify", name="ours-bf16")


def run_original_llama(rows, threads):
    from allinone.backends.base import GenerationParams
    from allinone.backends.llama_cpp import LlamaCppBackend
    from allinone.models import ensure_model
    from allinone.settings import EngineSettings

    # The full prompt every time: no cached task prefix, and no reuse of the previous request's
    # cells (its long instruction would otherwise be kept, as llama-server's cache_prompt does).
    engine = EngineSettings(threads=threads, prefix_cache_size=0, reuse_slots=False)
    backend = LlamaCppBackend(ensure_model("default"), engine, "default")
    backend.load()
    lat, pred, n_prompt = [], [], []
    for _, text in rows:
        t = time.perf_counter()
        prompt = backend.render_chat(
            [{"role": "user", "content": ORIGINAL_PROMPT.format(text=text)}], 0
        )
        fin = backend.generate(prompt, GenerationParams(max_tokens=12)).result()
        lat.append((time.perf_counter() - t) * 1000)
        pred.append(parse_label(fin.result))
        n_prompt.append(fin.usage.prompt_tokens)
    out = summarise(
        "original-llama",
        lat,
        pred,
        [LABELS[v] for v, _ in rows],
        {"prompt_tokens_mean": round(statistics.mean(n_prompt), 1)},
    )
    backend.close()
    return out


def _hf_dir() -> Path:
    """The default GGUF dequantised once into a safetensors folder (the backend's own cache)."""
    from allinone.backends.transformers_backend import hf_folder
    from allinone.models import ensure_model

    return hf_folder(ensure_model("default"))


def run_original_transformers(rows, threads):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    path = _hf_dir()
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    lat, pred = [], []
    with torch.inference_mode():
        for _, text in rows:
            t = time.perf_counter()
            messages = [{"role": "user", "content": ORIGINAL_PROMPT.format(text=text)}]
            ids = tok.apply_chat_template(
                messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
            )
            out = model.generate(**ids, max_new_tokens=12, do_sample=False)
            answer = tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)
            lat.append((time.perf_counter() - t) * 1000)
            pred.append(parse_label(answer))
    return summarise(
        "original-transformers",
        lat,
        pred,
        [LABELS[v] for v, _ in rows],
        {"load_s": round(load_s, 1)},
    )


def run_list32(rows, threads):
    import httpx

    from allinone.models import ensure_model
    from allinone.server_process import ServerProcess

    srv = ServerProcess(str(ensure_model("default")), {"ALLINONE_THREADS": str(threads)})
    srv.wait_ready()
    texts = [t for _, t in rows[:32]]
    url = f"{srv.url}/v1/classify"
    try:
        with httpx.Client(timeout=300) as client:
            client.post(url, json={"task": "sentiment", "input": "预热"})
            t = time.perf_counter()
            singles = [
                client.post(url, json={"task": "sentiment", "input": x}).json() for x in texts
            ]
            single_s = time.perf_counter() - t
            t = time.perf_counter()
            listed = client.post(url, json={"task": "sentiment", "input": texts}).json()
            list_s = time.perf_counter() - t
    finally:
        srv.stop()
    same = sum(
        a["results"][0]["label"] == b["label"]
        for a, b in zip(singles, listed["results"], strict=True)
    )
    return {
        "method": "list32",
        "n": len(texts),
        "single_calls_ms_per_text": round(single_s * 1000 / len(texts), 1),
        "one_list_ms_per_text": round(list_s * 1000 / len(texts), 1),
        "list_speedup": round(single_s / list_s, 2),
        "same_labels": same,
    }


RUNNERS = {
    "ours": run_ours,
    "ours-bf16": run_ours_bf16,
    "original-llama": run_original_llama,
    "original-transformers": run_original_transformers,
    "list32": run_list32,
}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    rows = read_tsv(SHARED_DATA / "chnsenticorp" / "test.tsv", args.texts)
    if args.child:
        print(json.dumps(RUNNERS[args.child](rows, args.threads)))
        return
    results = {}
    for method in args.methods.split(","):
        print(f"running {method} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(
            [
                sys.executable,
                __file__,
                "--child",
                method,
                "--texts",
                str(args.texts),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        if proc.returncode != 0:
            print(f"{method} failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{args.texts} ChnSentiCorp test texts, {args.threads} threads")
    print(f"{'method':<24}{'accuracy':>9}{'p50 ms':>9}{'mean ms':>9}{'RSS MB':>9}")
    for name, r in results.items():
        if name == "list32":
            continue
        print(
            f"{name:<24}{r['accuracy']:>9.3f}{r['latency_ms_p50']:>9.1f}"
            f"{r['latency_ms_mean']:>9.1f}{r['rss_mb_after']:>9.0f}"
        )
    for mine in ("ours", "ours-bf16"):
        for other in ("original-transformers", "original-llama"):
            if mine in results and other in results:
                m, o = results[mine], results[other]
                print(
                    f"{mine} vs {other}: {o['latency_ms_p50'] / m['latency_ms_p50']:.2f}x "
                    f"faster (median), {o['rss_mb_after'] / m['rss_mb_after']:.2f}x less "
                    f"memory, accuracy {m['accuracy']:.3f} vs {o['accuracy']:.3f}"
                )
    if "list32" in results:
        r = results["list32"]
        print(
            f"32 texts: one list {r['one_list_ms_per_text']} ms/text, 32 single calls "
            f"{r['single_calls_ms_per_text']} ms/text ({r['list_speedup']}x), "
            f"same labels {r['same_labels']}/32"
        )
    out = write_result(
        "classify",
        {"machine": machine(), "texts": args.texts, "threads": args.threads, "results": results},
    )
    print(f"saved {out}")


if __name__ == "__main__":
    main()
