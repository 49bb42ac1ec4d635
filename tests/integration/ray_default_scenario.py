"""The default model on Ray Serve, as a user sees it: the child process that
tests/integration/test_ray_serve.py runs inside a loopback-only network namespace it created
(``ip netns exec``). A Ray cluster of a head (0 CPUs, the front) and one worker node
(``ray.cluster_utils.Cluster``), this server's Serve application with one engine replica of the
default model, then requests through the front with the openai SDK: ``/v1/classify`` with the
built-in sentiment tasks, a chat completion, a streamed one. Writes what it saw as JSON
(``out``); the test asserts on it.

Usage: python ray_default_scenario.py '{"model": PATH, "out": FILE}'
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import openai

# (run as a script from this folder: its sibling is importable)
from ray_scenario import SERVE_OPTIONS, URL, cluster_run, log  # type: ignore[import-not-found]

from allinone.planner.plan import PlanRequest, make_plan
from allinone.scaleout.ray_config import REPLICA_HEADER, RayServeOptions
from allinone.scaleout.ray_serve import deploy

# Texts tests/integration/test_classify.py checks on the default model outside Ray.
REVIEWS = [
    ("sentiment", "这家酒店服务很好，环境也不错", "正面"),
    ("sentiment", "这家酒店太差了", "负面"),
    ("sentiment-en", "What a wonderful movie, I loved every minute of it.", "positive"),
    ("sentiment-en", "The food was cold and the waiter was rude.", "negative"),
]
COUNT = [{"role": "user", "content": "Count from 1 to 5."}]


def phase_requests(oc: openai.OpenAI, res: dict) -> None:
    res["models"] = sorted(m.id for m in oc.models.list())
    res["classify"] = []
    for task, text, expected in REVIEWS:
        r = oc.post("/classify", cast_to=httpx.Response, body={"task": task, "input": text})
        body = r.json()
        res["classify"].append(
            {
                "task": task,
                "text": text,
                "expected": expected,
                "status": r.status_code,
                "label": body["results"][0]["label"],
                "scores": body["results"][0]["scores"],
                "replica": r.headers.get(REPLICA_HEADER),
            }
        )
    log("classify done")
    raw = oc.chat.completions.with_raw_response.create(
        model="chat", messages=COUNT, max_tokens=30, temperature=0
    )
    chat = raw.parse()
    res["chat"] = {
        "text": chat.choices[0].message.content,
        "finish_reason": chat.choices[0].finish_reason,
        "completion_tokens": chat.usage.completion_tokens if chat.usage else None,
        "replica": raw.headers.get(REPLICA_HEADER),
    }
    log("chat done")
    with oc.chat.completions.with_streaming_response.create(
        model="chat", messages=COUNT, max_tokens=30, temperature=0, stream=True
    ) as streamed:
        pieces, finish = [], None
        for chunk in streamed.parse():
            for choice in chunk.choices:
                pieces.append(choice.delta.content or "")
                finish = choice.finish_reason or finish
        res["stream"] = {
            "chunks": len([p for p in pieces if p]),
            "text": "".join(pieces),
            "finish_reason": finish,
            "replica": streamed.headers.get(REPLICA_HEADER),
        }
    log("stream done")


def main() -> int:
    args = json.loads(sys.argv[1])
    res: dict = {"timings": {}}
    plan = make_plan(PlanRequest(model=args["model"], context=1024, concurrency=1, threads=2))
    with cluster_run(Path(args["out"]), res, [int(plan["host"]["cpus"])]):
        options = RayServeOptions.from_plan(
            plan,
            min_replicas=1,
            max_replicas=1,
            env_extra={"ALLINONE_GRAMMAR_PREWARM": "false"},
            **SERVE_OPTIONS,
        )
        t1 = time.monotonic()
        deploy(options)
        res["timings"]["deploy_s"] = time.monotonic() - t1
        log("application running")
        t2 = time.monotonic()
        with openai.OpenAI(base_url=f"{URL}/v1", api_key="x", max_retries=0, timeout=300) as oc:
            phase_requests(oc, res)
        res["timings"]["requests_s"] = time.monotonic() - t2
    return 0


if __name__ == "__main__":
    sys.exit(main())
