"""How often a greedy (or seeded) reply changes with what else the engine is doing.

For a fixed set of prompts, each reply is first taken alone on an idle server (the reference),
then again: (1) sent a second time, so the engine reuses the cells its first turn left;
(2) as 4 identical copies at once, batched together; (3) beside 6 other chats generating;
and, for seeded sampling at temperature 1, (4) the same seed alone and (5) beside other chats.
A flip is a reply whose text differs from its reference. Prints the flip rate of each case.

Usage: .venv/bin/python benchmarks/bench_determinism.py [--prompts 16] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.models import ensure_model
from allinone.server_process import ServerProcess
from common import machine, write_result

PROMPTS = [
    "Continue the English alphabet in capitals with no spaces, starting right after ABC.",
    "Explain what a hash table is in two sentences.",
    "Write a haiku about winter.",
    "List three uses of copper.",
    "What causes the seasons on Earth?",
    "Give a one-line Python function that reverses a string.",
    "Describe the taste of coffee to someone who has never had it.",
    "Name four planets and one fact about each.",
    "Why is the sky blue? Answer briefly.",
    "Write a short apology for being late to a meeting.",
    "What is the difference between a list and a tuple in Python?",
    "Suggest a name for a bakery and explain it.",
    "Summarise the plot of Cinderella in two sentences.",
    "How do vaccines work? Keep it simple.",
    "Translate 'good morning, how are you?' into French and Spanish.",
    "Give three tips for writing clear emails.",
    "介绍一下长城。",
    "用一句话解释什么是机器学习。",
    "写一首关于春天的短诗。",
    "列出三种常见的水果。",
]
NOISE = "Tell me a long story about a dragon who learns to cook."


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    prompts = PROMPTS[: args.prompts]
    model = ensure_model("default")
    env = {"ALLINONE_THREADS": str(args.threads), "ALLINONE_PARALLEL": "8"}
    env |= {"ALLINONE_MODEL_ID": "m", "ALLINONE_CTX_PER_SEQ": "1024"}
    env["ALLINONE_REQUEST_TIMEOUT_S"] = "900"  # a figure, not a deadline: a busy host is slow
    srv = ServerProcess(str(model), env, small=False)

    def ask(c: httpx.Client, text: str, **kw) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": text}]}
        body |= {"max_tokens": args.max_tokens, "temperature": 0, **kw}
        r = c.post(srv.url + "/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]

    def beside_noise(c: httpx.Client, pool: ThreadPoolExecutor, text: str, **kw) -> str:
        noise = [pool.submit(ask, c, NOISE, max_tokens=2 * args.max_tokens) for _ in range(6)]
        reply = ask(c, text, **kw)
        for f in noise:
            f.result()
        return reply

    flips: dict[str, int] = {}
    try:
        srv.wait_ready()
        with httpx.Client(timeout=900) as c, ThreadPoolExecutor(8) as pool:
            seeded = {"temperature": 1.0, "seed": 1234}
            for text in prompts:
                ref = ask(c, text)  # the first time: evaluated fresh, alone
                again = ask(c, text)  # the cells of the first are reused
                copies = list(pool.map(lambda _, t=text: ask(c, t), range(4)))
                loaded = beside_noise(c, pool, text)
                s_ref = ask(c, text, **seeded)
                s_again = ask(c, text, **seeded)
                s_loaded = beside_noise(c, pool, text, **seeded)
                for key, got in [
                    ("greedy, sent again (reused cells)", [again]),
                    ("greedy, 4 copies at once", copies),
                    ("greedy, beside 6 generating chats", [loaded]),
                ]:
                    flips[key] = flips.get(key, 0) + sum(g != ref for g in got)
                for key, got in [
                    ("seed, sent again", s_again),
                    ("seed, beside 6 generating chats", s_loaded),
                ]:
                    flips[key] = flips.get(key, 0) + (got != s_ref)
    finally:
        srv.stop()
    totals = {
        "greedy, sent again (reused cells)": len(prompts),
        "greedy, 4 copies at once": 4 * len(prompts),
        "greedy, beside 6 generating chats": len(prompts),
        "seed, sent again": len(prompts),
        "seed, beside 6 generating chats": len(prompts),
    }
    result = {
        "machine": machine(),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "flip_rate": {
            k: f"{flips.get(k, 0)}/{n} = {flips.get(k, 0) / n:.2f}" for k, n in totals.items()
        },
    }
    path = write_result("determinism", result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
