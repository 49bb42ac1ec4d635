"""Decisions: 8 questions about one text in one request, side by side in one run with the same 8
questions asked one request at a time, one question alone, and llama.cpp's llama-server.

Default model, ChnSentiCorp test texts of ~100 tokens, 2 threads, sequential requests on
loopback (each figure its own texts, so no server answers from a cache of an earlier figure):
  - 1 question: one /v1/decisions request with question 1, read with the server's default
    strategy, and the same texts read with ``codes`` (one reading, the reading before strategies;
    target: default at most 1.6x its time);
  - 8 questions: one request with all 8 (target: at most 3x the 1-question latency);
  - 8 x 1 question: the 8 questions as 8 requests, one after another (target: 8 questions in
    one request at least 2.5x faster), and the 8 sent at once;
  - llama-server: the same 8 prompts one after another, each with a grammar of its labels and
    ``cache_prompt`` (the text comes first, so its slot reuses it), no probabilities (target:
    ours at least 1.3x faster);
  - accuracy: the predicate "这条评论是负面的吗？" (threshold 0.5, and its ranking AUC) against
    /v1/classify with the sentiment task on the same texts.
Run: `.venv/bin/python benchmarks/bench_decisions.py [--texts 10] [--accuracy-texts 200]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.backends.chat_template import ChatTemplate
from allinone.decisions import (
    DecisionService,
    Option,
    Question,
    Strategy,
    choice_texts,
    predicate,
)
from allinone.models import ensure_model
from allinone.server_process import ServerProcess
from bench_engine import LlamaServer
from common import SHARED_DATA, llama_server_binary, machine, read_tsv, write_result

NEGATIVE = "这条评论是负面的吗？"
QUESTIONS = [
    {"type": "predicate", "instructions": NEGATIVE},
    {
        "type": "choice",
        "instructions": "评论的对象是什么？",
        "choices": [{"value": v} for v in ("酒店", "书籍", "电脑", "其他")],
    },
    {
        "type": "score",
        "instructions": "评论者有多满意？",
        "levels": [{"label": v} for v in ("很不满意", "不满意", "一般", "满意", "很满意")],
    },
    {"type": "predicate", "instructions": "评论提到了价格吗？"},
    {"type": "predicate", "instructions": "评论者会推荐给别人吗？"},
    {
        "type": "choice",
        "instructions": "评论最关心哪一方面？",
        "choices": [{"value": v} for v in ("质量", "服务", "价格", "环境", "物流")],
    },
    {
        "type": "score",
        "instructions": "评论写得有多详细？",
        "levels": [{"label": v} for v in ("很简短", "一般", "很详细")],
    },
    {"type": "predicate", "instructions": "评论提到了工作人员吗？"},
]


def internal(q: dict) -> Question:
    """The same question as the server builds it."""
    if q["type"] == "predicate":
        return predicate(q["instructions"])
    if q["type"] == "choice":
        opts = tuple(Option(t) for t in choice_texts([c["value"] for c in q["choices"]]))
        return Question("choice", q["instructions"], opts)
    return Question("score", q["instructions"], tuple(Option(lv["label"]) for lv in q["levels"]))


class _Renderer:
    """The parts of a backend DecisionService.prompt needs, with Qwen2.5's template (ChatML
    when a system message is given)."""

    def __init__(self) -> None:
        self.template = ChatTemplate(None)

    def render_chat(self, messages, n_prefix_messages):
        return self.template.render(messages, n_prefix_messages)


class _Service:
    backend = _Renderer()


def llama_prompts(text: str) -> list[tuple[str, str]]:
    """(prompt text, GBNF grammar of its labels) per question, exactly our prompts."""
    ds = DecisionService(_Service(), Strategy("codes"))
    out = []
    for q in QUESTIONS:
        prompt, branches, _ = ds.prompt(text, [internal(q)])
        segs = (*prompt.prefix, *prompt.body, *branches[0].suffix)
        labels = branches[0].labels
        grammar = "root ::= " + " | ".join(f'"{lab}"' for lab in labels)
        out.append(("".join(s.text for s in segs), grammar))
    return out


def ours(
    client: httpx.Client, url: str, text: str, questions: list[dict], strategy: str | None = None
) -> dict:
    body: dict = {"model": "m", "input": text, "questions": questions}
    if strategy:
        body["x_strategy"] = strategy
    r = client.post(url + "/v1/decisions", json=body)
    r.raise_for_status()
    return r.json()


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def auc(scores: list[float], positive: list[bool]) -> float:
    pos = [s for s, p in zip(scores, positive, strict=True) if p]
    neg = [s for s, p in zip(scores, positive, strict=True) if not p]
    return sum((x > y) + 0.5 * (x == y) for x in pos for y in neg) / (len(pos) * len(neg))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--texts", type=int, default=10, help="texts per latency figure")
    ap.add_argument("--accuracy-texts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-peer", action="store_true", help="skip llama-server (not built here)")
    args = ap.parse_args()
    model = ensure_model("default")
    binary = None if args.no_peer else llama_server_binary()
    rows = read_tsv(SHARED_DATA / "chnsenticorp" / "test.tsv")
    # ~100 tokens: 90-140 characters of Chinese text
    mid = [t for _, t in rows if 90 <= len(t) <= 140]
    n = args.texts
    sets = [mid[k * n : (k + 1) * n] for k in range(5)]
    env = {"ALLINONE_THREADS": str(args.threads), "ALLINONE_MODEL_ID": "m"}
    srv = ServerProcess(str(model), env, small=False)
    ls = LlamaServer(binary, model, 4, 2048, args.threads) if binary else None
    fig: dict[str, list[float]] = {}
    try:
        srv.wait_ready()
        if ls is not None:
            ls.wait_ready()
        with httpx.Client(timeout=600) as c:
            ours(c, srv.url, "预热", QUESTIONS)  # caches the decision prefix, as in service
            ours(c, srv.url, "预热", QUESTIONS, "codes")
            for t in sets[0]:  # the two readings of the same text, in turn
                fig.setdefault("1 question, codes", []).append(
                    timed(lambda t=t: ours(c, srv.url, t, QUESTIONS[:1], "codes"))
                )
                fig.setdefault("1 question", []).append(
                    timed(lambda t=t: ours(c, srv.url, t, QUESTIONS[:1]))
                )
            for t in sets[1]:
                fig.setdefault("8 questions, one request", []).append(
                    timed(lambda t=t: ours(c, srv.url, t, QUESTIONS))
                )
            for t in sets[2]:
                fig.setdefault("8 x 1 question, in turn", []).append(
                    timed(lambda t=t: [ours(c, srv.url, t, [q]) for q in QUESTIONS])
                )
            with ThreadPoolExecutor(8) as pool:
                for t in sets[3]:
                    fig.setdefault("8 x 1 question, at once", []).append(
                        timed(
                            lambda t=t: list(
                                pool.map(lambda q, t=t: ours(c, srv.url, t, [q]), QUESTIONS)
                            )
                        )
                    )

            def llama_8(t: str) -> None:
                for prompt, grammar in llama_prompts(t):
                    r = c.post(
                        ls.url + "/completion",
                        json={
                            "prompt": prompt,
                            "n_predict": 2,
                            "temperature": 0,
                            "cache_prompt": True,
                            "grammar": grammar,
                        },
                    )
                    r.raise_for_status()

            if ls is not None:
                llama_8("预热")
            for t in sets[4] if ls is not None else []:
                fig.setdefault("llama-server, 8 x 1 question, in turn", []).append(
                    timed(lambda t=t: llama_8(t))
                )
            # accuracy: the predicate against the sentiment classifier on the same texts
            acc_rows = rows[: args.accuracy_texts]
            texts = [t for _, t in acc_rows]
            negative = [v == "0" for v, _ in acc_rows]
            with ThreadPoolExecutor(8) as pool:
                dec = list(pool.map(lambda t: ours(c, srv.url, t, QUESTIONS[:1]), texts))
                cls = list(
                    pool.map(
                        lambda t: c.post(
                            srv.url + "/v1/classify", json={"task": "sentiment", "input": t}
                        ).json(),
                        texts,
                    )
                )
    finally:
        srv.stop()
        if ls is not None:
            ls.stop()
    p_neg = [d["answers"][0]["probability"] for d in dec]
    cls_neg = [r["results"][0]["scores"]["负面"] for r in cls]
    med = {k: statistics.median(v) for k, v in fig.items()}
    one, eight = med["1 question"], med["8 questions, one request"]
    result = {
        "machine": machine(),
        "texts_per_figure": n,
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "ratios": {
            "1 question default / codes (target <= 1.6)": round(one / med["1 question, codes"], 2),
            "8 questions / 1 question (target <= 3)": round(eight / one, 2),
            "8 x 1 in turn / 8 in one (target >= 2.5)": round(
                med["8 x 1 question, in turn"] / eight, 2
            ),
            "8 x 1 at once / 8 in one": round(med["8 x 1 question, at once"] / eight, 2),
            "llama-server 8 x 1 / ours 8 in one (target >= 1.3)": (
                round(med["llama-server, 8 x 1 question, in turn"] / eight, 2)
                if ls is not None
                else None
            ),
        },
        "accuracy": {
            "texts": len(texts),
            "predicate (P(true) > 0.5)": round(
                sum((p > 0.5) == g for p, g in zip(p_neg, negative, strict=True)) / len(texts), 3
            ),
            "classify sentiment": round(
                sum((p > 0.5) == g for p, g in zip(cls_neg, negative, strict=True)) / len(texts),
                3,
            ),
            "predicate AUC": round(auc(p_neg, negative), 3),
            "classify AUC": round(auc(cls_neg, negative), 3),
            "predicate mean P(true)": round(statistics.mean(p_neg), 3),
        },
    }
    path = write_result("decisions", result)
    import json

    print(json.dumps(result, indent=2, ensure_ascii=False))
    print(f"saved {path}")


if __name__ == "__main__":
    main()
