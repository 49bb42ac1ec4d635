"""Multi-turn chat with more conversations than sequences, side by side with llama-server.

8 users each hold a 4-turn conversation about a hotel review (one of ChnSentiCorp's test texts),
all at once, on 4 parallel sequences, so a user's next turn usually finds its sequence taken by
another conversation. Servers, each measured in turns (same GGUF, 2 threads):
  - allinone with its host-memory prompt cache (ALLINONE_PROMPT_CACHE_MB, default 128);
  - allinone with it off (ALLINONE_PROMPT_CACHE_MB=0): only the sequence's own cells are reused;
  - llama-server (its --cache-ram is on by default).
Reported per server: wall seconds for all 32 turns, generated tokens/s, and the prompt tokens it
evaluated (the rest came from a cache). Replies are greedy and capped at 48 tokens.
Run: `.venv/bin/python benchmarks/bench_conversations.py [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.models import ensure_model
from allinone.server_process import ServerProcess
from bench_engine import LlamaServer
from common import SHARED_DATA, llama_server_binary, machine, read_tsv, write_result

USERS = 8
PARALLEL = 4
REPLY_TOKENS = 48
QUESTIONS = [
    "请读这段酒店评论：\n{text}\n用一句话总结它。",
    "评论者最不满意的是什么？",
    "替酒店给这位客人写一句回复。",
    "把你的回复翻译成英文。",
]
_ids = itertools.count()


async def conversation(client: httpx.AsyncClient, url: str, text: str, llama: bool) -> dict:
    """One user's turns, each sent with the whole history; returns token counts."""
    # A tag never sent before, so no server can answer the first turn from an earlier round.
    messages = [{"role": "system", "content": f"对话 {next(_ids):05d}。你是一个简洁的助手。"}]
    evaluated = generated = 0
    for i, q in enumerate(QUESTIONS):
        messages.append({"role": "user", "content": q.format(text=text) if i == 0 else q})
        r = await client.post(
            f"{url}/v1/chat/completions",
            json={"model": "m", "messages": messages, "max_tokens": REPLY_TOKENS, "temperature": 0},
        )
        r.raise_for_status()
        body = r.json()
        usage = body["usage"]
        if llama:
            evaluated += body["timings"]["prompt_n"]
        else:
            evaluated += usage["prompt_tokens"] - usage["prompt_tokens_details"]["cached_tokens"]
        generated += usage["completion_tokens"]
        messages.append({"role": "assistant", "content": body["choices"][0]["message"]["content"]})
    return {"evaluated": evaluated, "generated": generated}


async def round_of_users(url: str, texts: list[str], llama: bool) -> dict:
    async with httpx.AsyncClient(timeout=600) as client:
        t0 = time.perf_counter()
        res = await asyncio.gather(*[conversation(client, url, t, llama) for t in texts])
        wall = time.perf_counter() - t0
    generated = sum(r["generated"] for r in res)
    return {
        "wall_s": round(wall, 2),
        "generated_tokens": generated,
        "tokens_per_s": round(generated / wall, 1),
        "prompt_tokens_evaluated": sum(r["evaluated"] for r in res),
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    model = ensure_model("default")
    binary = llama_server_binary()
    rows = read_tsv(SHARED_DATA / "chnsenticorp" / "test.tsv")
    # reviews of 80-200 characters: long enough that evaluating them again shows
    texts = [t for _, t in rows if 80 <= len(t) <= 200]
    env = {
        "ALLINONE_THREADS": str(args.threads),
        "ALLINONE_PARALLEL": str(PARALLEL),
        "ALLINONE_CTX_PER_SEQ": "1024",
        "ALLINONE_MODEL_ID": "m",
    }
    servers = {
        "allinone": ServerProcess(str(model), env),
        "allinone, no RAM cache": ServerProcess(
            str(model), {**env, "ALLINONE_PROMPT_CACHE_MB": "0"}
        ),
        "llama-server": LlamaServer(binary, model, PARALLEL, 1024, args.threads),
    }
    runs: dict[str, list[dict]] = {name: [] for name in servers}
    try:
        for srv in servers.values():
            srv.wait_ready()
        names = list(servers)
        for r in range(args.rounds):
            batch = texts[r * USERS : (r + 1) * USERS]  # the same reviews for every server
            for name in names if r % 2 == 0 else names[::-1]:
                res = asyncio.run(round_of_users(servers[name].url, batch, name == "llama-server"))
                runs[name].append(res)
                print(f"round {r} {name}: {res}", flush=True)
    finally:
        for srv in servers.values():
            srv.stop()
    print(f"\n{USERS} users x {len(QUESTIONS)} turns on {PARALLEL} sequences (median of rounds):")
    print(f"{'server':<26}{'wall s':>8}{'tokens/s':>10}{'prompt tokens evaluated':>26}")
    summary = {}
    for name, rs in runs.items():
        med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
        summary[name] = {"median": med, "rounds": rs}
        print(
            f"{name:<26}{med['wall_s']:>8.2f}{med['tokens_per_s']:>10.1f}"
            f"{med['prompt_tokens_evaluated']:>26.0f}"
        )

    # Replies differ a little between servers (batch composition moves near-ties), so rounds
    # differ in length: compare generated tokens/s, round by round.
    def paired(a: str, b: str) -> list[float]:
        return [
            x["tokens_per_s"] / y["tokens_per_s"] for x, y in zip(runs[a], runs[b], strict=True)
        ]

    for a, b in (("allinone", "llama-server"), ("allinone", "allinone, no RAM cache")):
        ratios = paired(a, b)
        summary[f"{a} / {b}"] = ratios
        print(
            f"tokens/s, {a} / {b}, round by round: {' '.join(f'{r:.2f}' for r in ratios)} "
            f"(median {statistics.median(ratios):.2f}x)"
        )
    print(f"saved {write_result('conversations', {'servers': summary, 'machine': machine()})}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
