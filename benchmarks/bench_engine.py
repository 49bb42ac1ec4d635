"""The engine under load, side by side with llama.cpp's own llama-server in one run.

Same GGUF, same threads, same number of parallel sequences. Both servers run at once (an idle
one takes no CPU) and each figure is taken from one, then the other, so that the machine's drift
in speed over minutes hits both. Measured through HTTP on loopback:
  - chat: 8 concurrent clients x 64-token replies, aggregate tokens/s (parallel 4, then 8;
    median of 3 rounds);
    one client's tokens/s against the raw single-sequence decode rate (no HTTP, no Python loop
    around requests: llama_decode one token at a time);
  - classification: median latency of single requests (llama-server: a grammar of the labels and
    its prompt cache); the same while 7 chats generate; texts/s with 8 clients against 1;
  - time to first token of a new chat while 7 others generate.
Run: `.venv/bin/python benchmarks/bench_engine.py [--parallel 4,8]` (builds llama-server once).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.models import ensure_model
from allinone.server_process import ServerProcess, free_port
from common import SHARED_DATA, llama_server_binary, machine, read_tsv, write_result

CHAT_PROMPTS = [
    "Write a long story about a dragon who learns to cook.",
    "请写一篇关于秋天的长文章。",
    "Explain in detail how a bicycle works.",
    "讲一个很长的关于大海的故事。",
    "Describe a journey across the desert in detail.",
    "请详细介绍一下中国的四大发明。",
    "Write a long letter to a friend about your holiday.",
    "详细描述一下你理想中的城市。",
]
SENTIMENT_SYSTEM = None  # read from the task file at run time
ROUNDS = 3  # chat load rounds per server; the median is reported
# Every chat opens with a tag never sent before: llama-server keeps whole prompts in RAM
# (--cache-ram) and, given the same prompt again, evaluates one token of it, so repeated
# rounds would measure its cache, not serving. With the tag, both servers can reuse the
# chat template's head (system prompt) and nothing more, as with real users' messages.
_chat_ids = itertools.count()


class LlamaServer:
    """llama.cpp's llama-server on a free loopback port."""

    def __init__(self, binary: str, model: Path, parallel: int, ctx_per_seq: int, threads: int):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log")  # noqa: SIM115
        cmd = [
            binary,
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(parallel),
            "-c",
            str(parallel * ctx_per_seq),
            "-t",
            str(threads),
            "-tb",
            str(threads),
            "--no-webui",
            "--cont-batching",
        ]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise RuntimeError(f"llama-server exited:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError("llama-server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def raw_decode_rate(model: Path, threads: int, n: int = 64) -> float:
    """Tokens/s of a bare greedy loop over llama_decode, one sequence, no HTTP."""
    import numpy as np

    from allinone.backends.llama_cpp.runtime import ContextShape, LlamaRuntime

    rt = LlamaRuntime(model, ContextShape(n_ctx=2048, n_seq_max=1, n_batch=512, threads=threads))
    toks = rt.tokenize(
        "<|im_start|>user\n" + CHAT_PROMPTS[0] + "<|im_end|>\n<|im_start|>assistant\n", special=True
    )
    rt.batch_clear()
    for i, t in enumerate(toks):
        rt.batch_add(t, i, 0, i == len(toks) - 1)
    rt.decode()
    tok = int(np.argmax(rt.logits(len(toks) - 1)))
    pos = len(toks)
    t0 = time.perf_counter()
    for _ in range(n):
        rt.batch_clear()
        rt.batch_add(tok, pos, 0, True)
        rt.decode()
        tok = int(np.argmax(rt.logits(0)))
        pos += 1
    rate = n / (time.perf_counter() - t0)
    rt.close()
    return rate


async def chat_once(
    client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int, llama: bool
) -> tuple[int, float, float]:
    """One streamed chat: (completion tokens, time to first token, total seconds)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"#{next(_chat_ids):05d} {prompt}"}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = None
    tokens = 0
    async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for ch in data.get("choices", []):
                if ch.get("delta", {}).get("content") and first is None:
                    first = time.perf_counter() - t0
    return tokens, first or 0.0, time.perf_counter() - t0


async def chat_load(url: str, model: str, clients: int, max_tokens: int, llama: bool) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(
            *[
                chat_once(
                    client, url, model, CHAT_PROMPTS[i % len(CHAT_PROMPTS)], max_tokens, llama
                )
                for i in range(clients)
            ]
        )
        wall = time.perf_counter() - t0
    tokens = sum(r[0] for r in res)
    return {
        "clients": clients,
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),
        "per_client_tokens_per_s": round(
            statistics.mean((r[0] - 1) / (r[2] - r[1]) for r in res if r[0] > 1), 1
        ),
    }


def classify_body(llama: bool, text: str, system: str) -> tuple[str, dict]:
    if not llama:
        return "/v1/classify", {"task": "sentiment", "input": text}
    prompt = (
        f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{text}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    return "/completion", {
        "prompt": prompt,
        "n_predict": 2,
        "temperature": 0,
        "cache_prompt": True,
        "grammar": 'root ::= "正面" | "负面"',
    }


async def classify_latency(
    url: str, texts: list[str], llama: bool, system: str, background: int = 0, model: str = ""
) -> list[float]:
    """Sequential single classifications (ms), optionally while `background` chats run."""
    async with httpx.AsyncClient(timeout=600) as client:
        bg = [
            asyncio.create_task(chat_once(client, url, model, CHAT_PROMPTS[i], 512, llama))
            for i in range(background)
        ]
        if bg:
            await asyncio.sleep(1.5)  # let the chats get past their prompts
        lat = []
        for text in texts:
            path, body = classify_body(llama, text, system)
            t = time.perf_counter()
            r = await client.post(url + path, json=body)
            r.raise_for_status()
            lat.append((time.perf_counter() - t) * 1000)
        for task in bg:
            task.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
    return lat


async def classify_throughput(
    url: str, texts: list[str], clients: int, llama: bool, system: str
) -> float:
    queue = list(texts)

    async def worker(client):
        while queue:
            path, body = classify_body(llama, queue.pop(), system)
            (await client.post(url + path, json=body)).raise_for_status()

    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*[worker(client) for _ in range(clients)])
    return len(texts) / (time.perf_counter() - t0)


async def ttft_under_load(url: str, model: str, llama: bool) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        bg = [
            asyncio.create_task(chat_once(client, url, model, CHAT_PROMPTS[i], 512, llama))
            for i in range(7)
        ]
        await asyncio.sleep(1.5)
        _, ttft, _ = await chat_once(client, url, model, "Say hello in five languages.", 16, llama)
        for task in bg:
            task.cancel()
        await asyncio.gather(*bg, return_exceptions=True)
    return ttft * 1000


# (label, value of one server's results, higher is better)
CLASSIFY_FIGURES = [
    ("classify p50 ms, alone", lambda r: r["classify_ms_p50_alone"], False),
    ("classify p50 ms, 7 chats running", lambda r: r["classify_ms_p50_with_7_chats"], False),
    ("classify texts/s, 1 client", lambda r: r["classify_texts_per_s_1_client"], True),
    ("classify texts/s, 8 clients", lambda r: r["classify_texts_per_s_8_clients"], True),
    ("TTFT ms, new chat + 7 generating", lambda r: r["ttft_ms_new_chat_with_7_generating"], False),
]


def measure(
    servers: dict[str, tuple[str, bool]],
    texts: list[str],
    system: str,
    rounds: int = ROUNDS,
    chat_only: bool = False,
) -> dict:
    """Every figure for each server ({name: (url, is_llama_server)}), taken back to back per
    figure so that drift in the machine's speed (several percent over minutes) hits both."""
    out: dict[str, dict] = {name: {} for name in servers}
    names = list(servers)

    def each():
        for name in names:
            yield name, *servers[name]

    # A 64-token round lasts seconds, so one round is noisy: take the median of a few, and
    # alternate which server goes first.
    for key, clients in (("chat_8_clients", 8), ("chat_1_client", 1)):
        runs: dict[str, list[dict]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                url, llama = servers[name]
                runs[name].append(asyncio.run(chat_load(url, "m", clients, 64, llama)))
        for name, rs in runs.items():
            in_order = [x["tokens_per_s"] for x in rs]
            out[name][key] = {
                **sorted(rs, key=lambda x: x["tokens_per_s"])[len(rs) // 2],
                "rounds": in_order,
            }
    if chat_only:
        return out
    # Fresh texts for every measurement: llama-server caches whole prompts and would answer a
    # repeated text almost for free. Alone and busy get different texts of matched lengths
    # (neighbours in length order), so the ratio of their medians measures the chats' effect,
    # not a difference in text length.
    by_length = sorted(texts[2:42], key=len)
    for name, url, llama in each():
        asyncio.run(classify_latency(url, texts[:2], llama, system))  # prefix into the cache
        alone = asyncio.run(classify_latency(url, by_length[0::2], llama, system))
        out[name]["classify_ms_p50_alone"] = round(statistics.median(alone), 1)
    for name, url, llama in each():
        busy = asyncio.run(
            classify_latency(url, by_length[1::2], llama, system, background=7, model="m")
        )
        out[name]["classify_ms_p50_with_7_chats"] = round(statistics.median(busy), 1)
    by_length = sorted(texts[42:90], key=len)
    for clients, half in ((1, by_length[0::2]), (8, by_length[1::2])):
        key = f"classify_texts_per_s_{clients}_client" + ("s" if clients > 1 else "")
        for name, url, llama in each():
            rate = asyncio.run(classify_throughput(url, half, clients, llama, system))
            out[name][key] = round(rate, 2)
    for name, url, llama in each():
        ttft = asyncio.run(ttft_under_load(url, "m", llama))
        out[name]["ttft_ms_new_chat_with_7_generating"] = round(ttft, 1)
    return out


def main() -> None:
    import tomllib

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--parallel", default="4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx-per-seq", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=ROUNDS, help="chat rounds per server")
    ap.add_argument("--chat-only", action="store_true", help="skip the classification figures")
    args = ap.parse_args()
    model = ensure_model("default")
    binary = llama_server_binary()
    task_file = Path(__file__).resolve().parents[1] / "src/allinone/tasks/builtin/sentiment.toml"
    system = tomllib.loads(task_file.read_text(encoding="utf-8"))["system"]
    texts = [t for _, t in read_tsv(SHARED_DATA / "chnsenticorp" / "test.tsv", 90)]
    results = {"by_parallel": {}}
    for p in [int(x) for x in args.parallel.split(",")]:
        srv = ServerProcess(
            str(model),
            {
                "ALLINONE_THREADS": str(args.threads),
                "ALLINONE_PARALLEL": str(p),
                "ALLINONE_CTX_PER_SEQ": str(args.ctx_per_seq),
                "ALLINONE_MODEL_ID": "m",
            },
        )
        ls = LlamaServer(binary, model, p, args.ctx_per_seq, args.threads)
        try:  # both up at once (an idle server takes no CPU), measured in turns
            srv.wait_ready()
            ls.wait_ready()
            # The raw rate is taken now, next to the figures it is compared with.
            raw = raw_decode_rate(model, args.threads)
            row = measure(
                {"allinone": (srv.url, False), "llama-server": (ls.url, True)},
                texts,
                system,
                args.rounds,
                args.chat_only,
            )
            row["raw_decode_tokens_per_s"] = round(raw, 1)
        finally:
            srv.stop()
            ls.stop()
        results["by_parallel"][p] = row
        print(f"\nparallel {p} (raw single-sequence decode {raw:.1f} tokens/s):", flush=True)
        print(f"{'figure':<40}{'allinone':>12}{'llama-server':>14}{'ratio':>8}")
        a, b = row["allinone"], row["llama-server"]
        # Rounds ran in turns, so round i of one server is paired with round i of the other.
        paired = [
            x / y
            for x, y in zip(
                a["chat_8_clients"]["rounds"], b["chat_8_clients"]["rounds"], strict=True
            )
        ]
        row["chat_8_clients_paired_ratio_median"] = round(statistics.median(paired), 3)
        print(
            f"chat 8 clients, round by round: {' '.join(f'{x:.2f}' for x in paired)} "
            f"(median {statistics.median(paired):.2f}x)"
        )
        figures = [
            ("chat 8 clients, tokens/s", lambda r: r["chat_8_clients"]["tokens_per_s"], True),
            ("chat 1 client, tokens/s", lambda r: r["chat_1_client"]["tokens_per_s"], True),
        ]
        if not args.chat_only:
            figures += CLASSIFY_FIGURES
        for key, pick, higher in figures:
            va, vb = pick(a), pick(b)
            ratio = (va / vb) if higher else (vb / va)
            print(f"{key:<40}{va:>12}{vb:>14}{ratio:>7.2f}x")
        one = a["chat_1_client"]["per_client_tokens_per_s"]
        print(f"one client vs raw decode: {one} / {raw:.1f} = {one / raw:.2f}")
        if not args.chat_only:
            busy_ratio = a["classify_ms_p50_with_7_chats"] / a["classify_ms_p50_alone"]
            print(f"classification with 7 chats running / alone: {busy_ratio:.2f}x")
    results["machine"] = machine()
    results["threads"] = args.threads
    print(f"saved {write_result('engine', results)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
