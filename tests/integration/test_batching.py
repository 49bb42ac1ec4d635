"""Continuous batching on the real default model: same answers under load, caps, cancellation."""

import threading

import httpx
import pytest

from allinone.backends.base import GenerationParams
from conftest import ServerProcess

# Batch composition changes llama.cpp's summation order (see test_classify.BATCH_TOLERANCE).
TOLERANCE = 0.02


def _busy(backend, n, stop):
    """Start n long generations that run until `stop` is set."""
    handles = []
    for i in range(n):
        prompt = backend.render_chat([{"role": "user", "content": f"Write a long story #{i}."}], 0)
        handles.append(backend.generate(prompt, GenerationParams(max_tokens=400)))

    def reaper():
        stop.wait()
        for h in handles:
            h.cancel()

    threading.Thread(target=reaper, daemon=True).start()
    return handles


def test_classification_same_alone_and_while_seven_requests_run(service):
    texts = ["这家酒店太差了", "服务周到，环境优雅，强烈推荐", "质量很差，用两天就坏了"]
    alone = service.classify("sentiment", texts)
    stop = threading.Event()
    handles = _busy(service.backend, 7, stop)
    try:
        busy = [service.classify("sentiment", [t])[0] for t in texts]
    finally:
        stop.set()
        for h in handles:
            h.result(timeout=120)
    for a, b in zip(alone, busy, strict=True):
        assert a.label == b.label
        for lab in a.scores:
            assert a.scores[lab] == pytest.approx(b.scores[lab], abs=TOLERANCE)


def test_long_text_among_generating_requests_runs_split_and_scores_the_same(service):
    # Prompt tokens plus the generating sequences' tokens reach 64: the engine decodes them in
    # two calls (see engine_loop._MIXED_STEP_SPLIT); the answer must not change.
    text = "房间很大，床很舒服，早餐种类丰富，服务员态度热情，位置也方便，离地铁站只有五分钟。" * 3
    (alone,) = service.classify("sentiment", [text])
    before = service.backend.stats()
    stop = threading.Event()
    handles = _busy(service.backend, 3, stop)  # 3 of the 4 sequences: the text gets the 4th
    try:
        for _ in range(600):  # until all three generate (at most a minute)
            if service.backend.stats()["generated_tokens"] >= before["generated_tokens"] + 6:
                break
            stop.wait(0.1)
        (busy,) = service.classify("sentiment", [text])
    finally:
        stop.set()
        for h in handles:
            h.result(timeout=120)
    assert alone.prompt_tokens - alone.cached_tokens >= 64
    assert service.backend.stats()["split_steps"] > before["split_steps"]
    assert busy.label == alone.label == "正面"
    for lab in alone.scores:
        assert alone.scores[lab] == pytest.approx(busy.scores[lab], abs=TOLERANCE)


def test_concurrent_chats_all_honour_the_task_caps(service):
    task = service.tasks.get("chat")
    plans = [
        service.plan_chat(task, [{"role": "user", "content": q}])
        for q in [
            "请详细介绍长城。",
            "讲一个长故事。",
            "Describe Paris in detail.",
            "介绍一下你自己。",
            "什么是人工智能？请详细说明。",
            "Tell me about the ocean.",
            "推荐几本书。",
            "你好",
        ]
    ]
    handles = [service.submit_chat(p)[0] for p in plans]
    for h in handles:
        fin = h.result(timeout=180)
        assert 0 < len(fin.result) <= task.output.max_chars
        assert fin.usage.completion_tokens <= task.output.max_tokens


@pytest.fixture(scope="module")
def one_slot_server(default_model_path):
    srv = ServerProcess(
        str(default_model_path), {"ALLINONE_PARALLEL": "1", "ALLINONE_MODEL_ID": "m"}
    )
    srv.wait_ready()
    yield srv
    srv.stop()


def test_closing_a_stream_frees_its_sequence(one_slot_server):
    url = one_slot_server.url
    body = {
        "model": "m",
        "stream": True,
        "max_tokens": 1000,
        "messages": [{"role": "user", "content": "Write a very long story."}],
    }
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
            for i, _ in enumerate(resp.iter_lines()):
                if i >= 6:
                    break  # the client goes away mid-generation
        # With one sequence, this can only run once the abandoned stream was cancelled.
        r = client.post(f"{url}/v1/classify", json={"task": "sentiment", "input": "很好"})
        assert r.status_code == 200
        engine = client.get(f"{url}/ready").json()["engine"]
    assert engine["cancelled"] >= 1
    assert engine["generated_tokens"] < 1000
    assert engine["active"] == 0
