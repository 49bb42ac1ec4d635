"""Structured outputs: what a JSON schema costs, side by side in one run.

1. Per decode step, on the default model's 152k vocabulary, in process: llguidance's token
   mask (what the server uses) against llama.cpp's own grammar sampler (reached through
   llama-cpp-python's low-level API, on a GBNF made by llama-cpp-python's schema converter),
   both walking the same JSON reply token by token.
2. End to end over HTTP: generated tokens/s (prefill included) of our server with and without
   the schema, one stream and 8 at once, and llama.cpp's llama-server with the same schema
   (``response_format`` json_schema) on the same prompts, same threads, same slots. Both
   servers run at once and take turns round by round (an idle one takes no CPU).
3. Tool choice: on a small labelled set of requests (which function, or none), the rate at
   which ``tool_choice: "auto"`` picks the right one.

Usage: .venv/bin/python benchmarks/bench_structured.py [--rounds 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.models import ensure_model
from allinone.server_process import ServerProcess
from bench_engine import LlamaServer
from common import llama_server_binary, machine, write_result

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "city", "hobbies", "bio"],
    "additionalProperties": False,
}
PROMPTS = [
    f"Invent a person who lives in {city} and describe them in detail: name, age, hobbies "
    "and a two-sentence biography."
    for city in ("Lisbon", "Osaka", "Quito", "Tallinn", "Accra", "Perth", "Bergen", "Cusco")
]
MAX_TOKENS = 128
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "convert_currency",
            "description": "Convert an amount of money from one currency to another",
            "parameters": {
                "type": "object",
                "properties": {
                    "amount": {"type": "number"},
                    "from_currency": {"type": "string"},
                    "to_currency": {"type": "string"},
                },
                "required": ["amount", "from_currency", "to_currency"],
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "send_email",
            "description": "Send an email to a recipient",
            "parameters": {
                "type": "object",
                "properties": {
                    "to": {"type": "string"},
                    "subject": {"type": "string"},
                    "body": {"type": "string"},
                },
                "required": ["to", "subject", "body"],
            },
        },
    },
]
# (request, the function a person would expect, or None for a plain answer)
TOOL_CASES = [
    ("What's the weather like in Paris right now?", "get_weather"),
    ("Is it raining in London today?", "get_weather"),
    ("Tell me the current temperature in Tokyo.", "get_weather"),
    ("How cold is it in Oslo at the moment?", "get_weather"),
    ("Convert 100 US dollars to euros.", "convert_currency"),
    ("How many yen is 50 pounds?", "convert_currency"),
    ("Change 20 EUR into CHF for me.", "convert_currency"),
    ("What is 300 Canadian dollars in US dollars?", "convert_currency"),
    ("Email bob@example.com that the meeting moved to 3pm.", "send_email"),
    ("Send an email to ana@corp.com with subject 'Invoice' saying it is paid.", "send_email"),
    ("Write to tom@x.org to say thanks for the book.", "send_email"),
    ("Let alice@y.com know by email that the build is green.", "send_email"),
    ("What is the capital of France?", None),
    ("Write a haiku about autumn.", None),
    ("Explain what a linked list is in one sentence.", None),
    ("What is 7 times 8?", None),
]


# -- 1. per-step mask cost -------------------------------------------------------------------


def per_step(model: Path) -> dict:
    """ms per token for llguidance's mask and llama.cpp's grammar sampler, same tokens."""
    import llama_cpp
    import numpy as np
    from llama_cpp.llama_grammar import json_schema_to_gbnf

    from allinone.backends.llama_cpp.grammar import GrammarCompiler
    from allinone.backends.llama_cpp.runtime import ContextShape, LlamaRuntime

    rt = LlamaRuntime(model, ContextShape(n_ctx=256, n_seq_max=1, n_batch=64, threads=1))
    reply = json.dumps(
        {
            "name": "Ana Souza",
            "age": 34,
            "city": "Lisbon",
            "hobbies": ["surfing", "reading", "chess"],
            "bio": "Ana grew up by the sea and now teaches maths at a school near the river.",
        },
        separators=(",", ":"),
    )
    tokens = rt.tokenize(reply, special=False)
    t0 = time.perf_counter()
    compiler = GrammarCompiler(rt.vocab, rt.n_vocab, rt.is_eog)
    compiler.tokenizer()
    index_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    matcher = compiler.json_schema(SCHEMA).matcher()
    compile_ms = 1000 * (time.perf_counter() - t0)
    llg = []
    for tok in tokens:
        t0 = time.perf_counter()
        allowed = matcher.allowed()
        llg.append(time.perf_counter() - t0)
        assert allowed[tok]
        matcher.accept(tok)
    # llama.cpp: its grammar sampler over a full candidate array each step
    gbnf = json_schema_to_gbnf(json.dumps(SCHEMA))
    t0 = time.perf_counter()
    smpl = llama_cpp.llama_sampler_init_grammar(rt.vocab, gbnf.encode(), b"root")
    gbnf_compile_ms = 1000 * (time.perf_counter() - t0)
    n = rt.n_vocab
    data = (llama_cpp.llama_token_data * n)()
    logits = np.random.default_rng(0).standard_normal(n).astype(np.float32)
    cpp = []
    for tok in tokens:
        for i in range(n):  # fresh candidates, as a sampler chain gets them each step
            data[i].id, data[i].logit, data[i].p = i, float(logits[i]), 0.0
        arr = llama_cpp.llama_token_data_array(
            data=ctypes.cast(data, ctypes.POINTER(llama_cpp.llama_token_data)),
            size=n,
            selected=-1,
            sorted=False,
        )
        t0 = time.perf_counter()
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        cpp.append(time.perf_counter() - t0)
        llama_cpp.llama_sampler_accept(smpl, tok)
    llama_cpp.llama_sampler_free(smpl)
    rt.close()
    return {
        "tokens": len(tokens),
        "vocab": n,
        "llguidance vocabulary index s (once per process)": round(index_s, 2),
        "llguidance compile ms": round(compile_ms, 1),
        "llguidance mask ms/token, median": round(1000 * statistics.median(llg), 3),
        "llguidance mask ms/token, mean": round(1000 * statistics.mean(llg), 3),
        "llama.cpp grammar compile ms": round(gbnf_compile_ms, 1),
        "llama.cpp grammar ms/token, median": round(1000 * statistics.median(cpp), 3),
        "llama.cpp grammar ms/token, mean": round(1000 * statistics.mean(cpp), 3),
    }


# -- 2. end to end -----------------------------------------------------------------------------


def _chat(c: httpx.Client, url: str, model: str, prompt: str, schema: bool) -> tuple[int, str, str]:
    """(completion tokens, reply, finish reason)."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": MAX_TOKENS,
        "temperature": 0,
    }
    if schema:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "person", "schema": SCHEMA, "strict": True},
        }
    r = c.post(url + "/v1/chat/completions", json=body)
    r.raise_for_status()
    d = r.json()
    choice = d["choices"][0]
    return d["usage"]["completion_tokens"], choice["message"]["content"], choice["finish_reason"]


def one_round(c: httpx.Client, url: str, schema: bool, streams: int, r: int, tag: str) -> dict:
    """Round ``r``: one batch of ``streams`` requests sent at once: generated tokens, seconds,
    and of the replies that ended before ``max_tokens`` (finish "stop"), how many ended so and
    how many parse with every required key.

    Each request's prompt starts with its own tag, so no figure gets another's prompt from a
    server's prompt cache (both servers reuse cached prompts: without the tag, whichever
    configuration ran second skipped its prefill)."""
    batch = [f"[{tag}-{i}] " + PROMPTS[(r * streams + i) % len(PROMPTS)] for i in range(streams)]
    with ThreadPoolExecutor(streams) as pool:
        t0 = time.perf_counter()
        out = list(pool.map(lambda p: _chat(c, url, "m", p, schema), batch))
        secs = time.perf_counter() - t0
    ended = valid = 0
    for _, text, finish in out:
        if finish != "stop":
            continue
        ended += 1
        with contextlib.suppress(ValueError, TypeError):
            valid += set(json.loads(text)) == set(SCHEMA["properties"])
    return {"tokens": sum(k for k, _, _ in out), "s": secs, "ended": ended, "valid": valid}


def side_by_side(c: httpx.Client, servers: dict[str, str], rounds: int) -> dict:
    """Tokens/s of each server, free and under the schema, 1 and 8 streams. Round by round the
    servers take turns (the order alternates), so the machine's drift in speed (here often
    +-20% over minutes: other tenants' memory traffic) hits all of them alike; per round, the
    ratio of ours to the peer is taken, and its median over the rounds is reported."""
    out: dict = {"tokens_per_s": {}, "schema_replies_valid": {}, "round_ratios": {}}
    for streams in (1, 8):
        for schema in (False, True):
            what = f"{'schema' if schema else 'free'}, {streams} stream(s)"
            per: dict[str, list[dict]] = {name: [] for name in servers}
            for r in range(rounds):
                order = list(servers.items())
                for name, url in order if r % 2 else reversed(order):
                    tag = f"{name}, {what}, {r}"
                    per[name].append(one_round(c, url, schema, streams, r, tag))
            for name, rs in per.items():
                key = f"{name}, {what}"
                rate = sum(x["tokens"] for x in rs) / sum(x["s"] for x in rs)
                out["tokens_per_s"][key] = round(rate, 1)
                if schema:
                    out["schema_replies_valid"][key] = {
                        "ended": sum(x["ended"] for x in rs),
                        "valid": sum(x["valid"] for x in rs),
                    }
                print(key, round(rate, 1), "tok/s", flush=True)
            if "llama-server" in per:
                ratios = [
                    (a["tokens"] / a["s"]) / (b["tokens"] / b["s"])
                    for a, b in zip(per["ours"], per["llama-server"], strict=True)
                ]
                out["round_ratios"][what] = [round(x, 3) for x in ratios]
    return out


def tool_accuracy(c: httpx.Client, url: str, model: str) -> dict:
    right, per = 0, []
    for text, want in TOOL_CASES:
        body = {
            "model": model,
            "messages": [{"role": "user", "content": text}],
            "tools": TOOLS,
            "max_tokens": 96,
            "temperature": 0,  # greedy: the rate repeats run to run
        }
        r = c.post(url + "/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{text!r}: HTTP {r.status_code} {r.text}")
        msg = r.json()["choices"][0]["message"]
        got = msg["tool_calls"][0]["function"]["name"] if msg.get("tool_calls") else None
        right += got == want
        per.append({"request": text, "expected": want, "got": got})
    rate = round(right / len(TOOL_CASES), 3)
    return {"cases": len(TOOL_CASES), "right": right, "rate": rate, "per_case": per}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=6, help="batches per figure and server")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default", help="catalog name (default, accurate)")
    ap.add_argument("--skip-peer", action="store_true", help="no llama-server figures")
    ap.add_argument(
        "--tools-only",
        action="store_true",
        help="only the tool-choice rate (3.): no timing, so it may share the cores",
    )
    args = ap.parse_args()
    if args.tools_only:
        args.skip_peer = True
    model = ensure_model(args.model)
    result: dict = {"machine": machine(), "model": model.name, "max_tokens": MAX_TOKENS}
    if not args.tools_only:
        result["per_step"] = per_step(model)
        print(json.dumps(result["per_step"], indent=2))
    env = {"ALLINONE_THREADS": str(args.threads), "ALLINONE_PARALLEL": "8"}
    env |= {
        "ALLINONE_MODEL_ID": "m",
        "ALLINONE_CTX_PER_SEQ": "1024",
        "ALLINONE_REQUEST_TIMEOUT_S": "900",
    }
    srv = ServerProcess(str(model), env, small=False)
    ls = (
        None if args.skip_peer else LlamaServer(llama_server_binary(), model, 8, 1024, args.threads)
    )
    try:
        srv.wait_ready()
        servers = {"ours": srv.url}
        if ls is not None:
            ls.wait_ready()
            servers["llama-server"] = ls.url
        with httpx.Client(timeout=900) as c:
            for url in servers.values():
                _chat(c, url, "m", PROMPTS[0], True)  # warm: ours builds its vocabulary index
            if not args.tools_only:
                result |= side_by_side(c, servers, args.rounds)
            result["tool_choice_auto"] = tool_accuracy(c, srv.url, "m")
    finally:
        srv.stop()
        if ls is not None:
            ls.stop()
    figs = result.get("tokens_per_s", {})
    ratios = {}
    for s in () if args.tools_only else (1, 8):
        ours_c, ours_f = figs[f"ours, schema, {s} stream(s)"], figs[f"ours, free, {s} stream(s)"]
        ratios[f"ours schema / free, {s} stream(s) (target >= 0.8)"] = round(ours_c / ours_f, 2)
        if ls is not None:
            per_round = result["round_ratios"][f"schema, {s} stream(s)"]
            ratios[
                f"ours schema / llama-server schema, {s} stream(s), median of rounds (target >= 1)"
            ] = round(statistics.median(per_round), 2)
            ratios[f"ours schema / llama-server schema, {s} stream(s), whole run"] = round(
                ours_c / figs[f"llama-server, schema, {s} stream(s)"], 2
            )
    result["ratios"] = ratios
    name = f"structured-{args.model}" + ("-tools" if args.tools_only else "")
    path = write_result(name, result)
    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
