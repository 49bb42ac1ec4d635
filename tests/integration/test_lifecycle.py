"""A request's life from route to engine: one request's failure stays its own, a dead engine
ends the process, and disconnects and deadlines cancel the engine work on every route."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest
from test_engine import assert_no_leaks, chat_prompt, collect

from allinone.backends.base import BackendError, GenerationParams
from allinone.backends.llama_cpp import engine_loop as sched_mod
from conftest import ServerProcess, free_port


def test_a_failure_in_one_request_leaves_its_neighbours_in_the_same_step_running(
    tiny_backend_factory, monkeypatch
):
    backend = tiny_backend_factory(parallel=4)
    real = sched_mod.sample_token

    def poisoned(logits, params, rng):
        if params.temperature == 0.77:  # this request's processing raises, mid-generation
            raise FloatingPointError("injected")
        return real(logits, params, rng)

    monkeypatch.setattr(sched_mod, "sample_token", poisoned)
    good = [
        backend.generate(chat_prompt(backend, f"Count to {i}."), GenerationParams(max_tokens=16))
        for i in range(3)
    ]
    bad = backend.generate(
        chat_prompt(backend, "Say hello."), GenerationParams(max_tokens=16, temperature=0.77)
    )
    with pytest.raises(BackendError, match="injected"):
        collect(bad)
    for h in good:
        text, fin = collect(h)
        assert fin.reason in ("stop", "length") and text.strip()
    assert backend.health()  # the loop lives on
    text, fin = collect(
        backend.generate(chat_prompt(backend, "Name a colour."), GenerationParams(max_tokens=8))
    )
    assert text.strip()
    assert backend.stats()["failed"] == 1
    assert_no_leaks(backend)


def test_a_temperature_too_small_to_divide_by_is_served_greedy(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    prompt = chat_prompt(backend, "The capital of France is")
    greedy, _ = collect(backend.generate(prompt, GenerationParams(max_tokens=12)))
    for t in (5e-324, 1e-308):
        text, fin = collect(
            backend.generate(prompt, GenerationParams(max_tokens=12, temperature=t, seed=1))
        )
        assert fin.reason in ("stop", "length") and text == greedy
    assert backend.health()


_CRASHING_SERVER = """
import sys
from allinone.backends.llama_cpp import engine_loop
from allinone.cli import main

def crash(self):  # the loop's step raises: a bug in the engine, not in one request
    raise RuntimeError("injected loop crash")

engine_loop.EngineLoop._step = crash
sys.exit(main(["serve", "--port", sys.argv[1]]))
"""


@pytest.mark.parametrize("exit_on_fatal", [True, False])
def test_a_dead_engine_ends_the_process_non_zero_and_says_why_meanwhile(
    tiny_model_path, exit_on_fatal
):
    port = free_port()
    env = {
        **os.environ,
        "ALLINONE_MODEL": str(tiny_model_path),
        "ALLINONE_THREADS": "2",
        "ALLINONE_CTX_PER_SEQ": "1024",
        "ALLINONE_DRAIN_TIMEOUT_S": "5",
        "ALLINONE_EXIT_ON_FATAL": str(exit_on_fatal).lower(),
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", _CRASHING_SERVER, str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("ready"):
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        body = {"model": "chat", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}
        r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "engine_dead"
        if not exit_on_fatal:  # kept up for debugging: it says it is dead, and why
            time.sleep(1)
            h = httpx.get(f"{url}/health", timeout=5)
            assert h.status_code == 503 and "injected loop crash" in h.json()["error"]
            r = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert httpx.get(f"{url}/ready", timeout=5).status_code == 503
            proc.terminate()
            assert proc.wait(timeout=60) == 0
            return
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = proc.stdout.read()
    assert code == 1, out
    assert "injected loop crash" in out and "cannot serve" in out


def _engine(srv) -> dict:
    return httpx.get(f"{srv.url}/ready", timeout=10).json()["engine"]


def _settles(srv, timeout: float = 30.0) -> dict:
    """Wait until the engine holds no request; its stats then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = _engine(srv)
        if stats["active"] == 0 and stats["queue_depth"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the engine still holds work: {stats}")


def _hang_up(srv, path: str, body: dict, after: float = 0.5) -> None:
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{srv.url}{path}", json=body, timeout=after)


LONG_CHAT = {
    "model": "m",
    "max_tokens": 900,
    "messages": [{"role": "user", "content": "Write a very long story about the sea."}],
}
MANY_TEXTS = {
    "task": "sentiment-en",
    "input": [f"review {i}: " + "so so " * 150 for i in range(60)],
}
MANY_QUESTIONS = [
    {"type": "predicate", "instructions": f"Statement {k}: " + "it is so " * 20} for k in range(60)
]
# the decision prompt's worked examples take ~450 of the test server's 1,024 tokens a sequence
LONG_DECISION = {"model": "m", "input": "ok " * 300, "questions": MANY_QUESTIONS}
LONG_SYSTEMONE = {
    "model": "m",
    "state": "ok " * 300,
    "questions": {
        f"q{k}": {"type": "noul", "instructions": q["instructions"]}
        for k, q in enumerate(MANY_QUESTIONS)
    },
}
LONG_EXTRACT = {"task": "summarize", "input": "客户：" + "快递一直没有到，我很着急。" * 10}


def _long_stream(srv):
    return httpx.stream(
        "POST", f"{srv.url}/v1/chat/completions", json={**LONG_CHAT, "stream": True}, timeout=60
    )


@pytest.fixture(scope="module")
def lifecycle_server(tiny_model_path):
    with ServerProcess.running(str(tiny_model_path), {"ALLINONE_MODEL_ID": "m"}) as srv:
        yield srv


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", LONG_CHAT),
        ("/v1/classify", MANY_TEXTS),
        (
            "/v1/chat/completions",
            {"model": "sentiment-en", "messages": [{"role": "user", "content": "ok " * 600}]},
        ),
        ("/v1/decisions", LONG_DECISION),
        ("/v1/systemone", LONG_SYSTEMONE),
    ],
    ids=["chat", "classify", "classify-as-chat", "decisions", "systemone"],
)
def test_a_client_that_hangs_up_cancels_the_engine_work_on_every_route(
    lifecycle_server, path, body
):
    srv = lifecycle_server
    before = _settles(srv)
    _hang_up(srv, path, body, after=0.3)
    after = _settles(srv)
    assert after["cancelled"] > before["cancelled"], (before, after)
    if path == "/v1/chat/completions" and body is LONG_CHAT:
        assert after["generated_tokens"] - before["generated_tokens"] < 900


def test_an_extraction_whose_client_hangs_up_starts_no_further_field(tiny_server):
    # One sequence, held by a long stream: the extraction's first field waits in the queue
    # when its client hangs up (the tiny model answers a whole extraction in ~0.1 s otherwise).
    srv = tiny_server(ALLINONE_PARALLEL="1")
    before = _settles(srv)
    with _long_stream(srv) as occupier:
        next(occupier.iter_lines())
        _hang_up(srv, "/v1/extract", LONG_EXTRACT, after=0.3)
    after = _settles(srv)
    # the stream and the extraction's first field were cancelled; no field ran
    assert after["cancelled"] - before["cancelled"] == 2, (before, after)
    assert after["finished"] == before["finished"]


def test_the_request_timeout_cancels_the_engine_work_and_answers_504(tiny_server):
    srv = tiny_server(ALLINONE_REQUEST_TIMEOUT_S="0.5")
    for path, body in [("/v1/chat/completions", LONG_CHAT), ("/v1/extract", LONG_EXTRACT)]:
        before = _settles(srv)
        r = httpx.post(f"{srv.url}{path}", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
        after = _settles(srv)
        assert after["cancelled"] > before["cancelled"]
    # a stream checks its deadline while it waits, not only when a token arrives
    with _long_stream(srv) as resp:
        lines = [line for line in resp.iter_lines() if line]
    assert '"timeout"' in lines[-2] and lines[-1] == "data: [DONE]"
    _settles(srv)


def test_a_task_answered_through_a_stream_honours_include_usage(lifecycle_server):
    body = {
        "model": "sentiment-en",
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "I loved it"}],
    }
    with httpx.stream(
        "POST", f"{lifecycle_server.url}/v1/chat/completions", json=body, timeout=60
    ) as r:
        lines = [line for line in r.iter_lines() if line]
    events = [json.loads(line[6:]) for line in lines[:-1]]
    assert lines[-1] == "data: [DONE]"
    assert events[0]["choices"][0]["delta"]["content"] in ("positive", "negative")
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["prompt_tokens"] > 0
