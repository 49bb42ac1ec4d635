"""The HTTP server with the real default model: OpenAI SDK, task endpoints, health."""

import httpx
import openai
import pytest


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def test_openai_sdk_plain_chat(client):
    resp = client.chat.completions.create(
        model="chat", messages=[{"role": "user", "content": "你好，请用一句话介绍你自己。"}]
    )
    text = resp.choices[0].message.content
    assert text.strip() and len(text) <= 60
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage.completion_tokens > 0 and resp.usage.prompt_tokens > 0


def test_openai_sdk_streamed_chat(client):
    stream = client.chat.completions.create(
        model="qwen-default",
        messages=[{"role": "user", "content": "Count from 1 to 5."}],
        stream=True,
        max_tokens=30,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    text = "".join(pieces)
    assert "1" in text and "3" in text
    assert finish in ("stop", "length")
    assert usage is not None and usage.completion_tokens <= 30


def test_next_chat_turn_reports_the_earlier_turns_as_cached(client):
    history = [{"role": "user", "content": "Name a colour."}]
    first = client.chat.completions.create(model="qwen-default", messages=history, max_tokens=8)
    history += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And an animal?"},
    ]
    second = client.chat.completions.create(model="qwen-default", messages=history, max_tokens=8)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # the first turn's prompt and reply were kept in the engine, not evaluated again
    assert cached >= first.usage.prompt_tokens
    assert cached < second.usage.prompt_tokens


def test_models_lists_model_and_tasks(client):
    ids = {m.id for m in client.models.list()}
    assert {"qwen-default", "sentiment", "sentiment-en", "chat"} <= ids


def test_classify_task_through_the_chat_api_answers_a_label(client):
    resp = client.chat.completions.create(
        model="sentiment", messages=[{"role": "user", "content": "这家酒店太差了"}]
    )
    assert resp.choices[0].message.content == "负面"


def test_classify_endpoint_single_and_list_in_order(server):
    r = httpx.post(
        f"{server.url}/v1/classify",
        json={"task": "sentiment", "input": "这家酒店太差了"},
        timeout=60,
    )
    assert r.status_code == 200
    body = r.json()
    assert body["results"][0]["label"] == "负面"
    assert set(body["results"][0]["scores"]) == {"正面", "负面"}
    texts = ["服务很好，非常满意", "太差了，不会再来", "环境优雅，菜品可口", "质量很差，退货了"]
    r = httpx.post(
        f"{server.url}/v1/classify", json={"task": "sentiment", "input": texts}, timeout=60
    )
    labels = [x["label"] for x in r.json()["results"]]
    assert labels == ["正面", "负面", "正面", "负面"]
    assert [x["index"] for x in r.json()["results"]] == [0, 1, 2, 3]


def test_health_ready_and_tasks(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    ready = httpx.get(f"{server.url}/ready")
    assert ready.status_code == 200 and ready.json()["model"] == "qwen-default"
    # where the thread count comes from: affinity mask and any container CPU quota
    threads = ready.json()["threads"]
    assert threads["count"] >= 1 and threads["default"]["source"]
    tasks = {t["name"]: t for t in httpx.get(f"{server.url}/v1/tasks").json()["data"]}
    assert tasks["sentiment"]["labels"] == ["正面", "负面"]
