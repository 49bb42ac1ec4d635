"""Anthropic's Messages API (/v1/messages, /v1/messages/count_tokens), driven by the anthropic
SDK against a real server on loopback with the default model: plain and streamed replies (the
event order of Anthropic's stream), stop sequences, a tool round trip, structured output,
count_tokens against a reply's usage, task names as the model, the x-api-key header, and bad
input answered in Anthropic's error shape naming the field, the server serving on."""

from __future__ import annotations

import json

import anthropic
import httpx
import pytest

MODEL = "qwen-default"
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    with anthropic.Anthropic(base_url=server.url, api_key="x", max_retries=0, timeout=600) as c:
        yield c


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _frames(response: httpx.Response) -> list[tuple[str | None, dict]]:
    """(event name, data) of each SSE frame."""
    frames = []
    for chunk in response.read().decode().split("\n\n"):
        if not chunk.strip():
            continue
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        frames.append((lines.get("event"), json.loads(lines["data"])))
    return frames


# -- replies -----------------------------------------------------------------------------------


def test_a_plain_reply_is_an_anthropic_message(client):
    msg = client.messages.create(
        model=MODEL,
        max_tokens=20,
        system=[
            {"type": "text", "text": "You are a friendly assistant."},
            {"type": "text", "text": "Answer briefly."},
        ],
        messages=_ask("Say hello."),
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0, "top_k": 40},
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == MODEL
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"] and msg.content[0].text.strip()
    assert msg.stop_reason in ("end_turn", "max_tokens") and msg.stop_sequence is None
    assert 0 < msg.usage.output_tokens <= 20
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens > 10


def test_a_streamed_reply_follows_anthropic_event_order(server):
    body = {"model": MODEL, "max_tokens": 12, "stream": True, "messages": _ask("Say hello.")}
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=600) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        frames = _frames(r)
    # every frame names its event, and the name is its data's type
    assert all(event == data["type"] for event, data in frames)
    kinds = [data["type"] for _, data in frames]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[2:-3]) == {"content_block_delta"}
    start = frames[0][1]["message"]
    assert (
        start["content"] == [] and start["stop_reason"] is None and start["id"].startswith("msg_")
    )
    assert frames[1][1] == {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": "", "citations": None},
    }
    deltas = [data["delta"] for _, data in frames[2:-3]]
    assert all(d["type"] == "text_delta" for d in deltas) and "".join(d["text"] for d in deltas)
    end = frames[-2][1]
    assert end["delta"]["stop_reason"] in ("end_turn", "max_tokens")
    assert end["usage"]["output_tokens"] > 0
    assert end["usage"]["input_tokens"] + end["usage"]["cache_read_input_tokens"] > 10


def test_the_sdk_stream_helper_joins_the_deltas_to_the_final_text(client):
    with client.messages.stream(model=MODEL, max_tokens=16, messages=_ask("Name a color.")) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == s.get_final_text() == final.content[0].text
    assert final.content[0].text.strip()
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert final.usage.output_tokens > 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 10


def test_a_stop_sequence_ends_the_reply_and_is_reported(client):
    msg = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=_ask("Count from 1 to 10, separated by spaces."),
        stop_sequences=["5"],
    )
    assert msg.stop_reason == "stop_sequence" and msg.stop_sequence == "5"
    assert "4" in msg.content[0].text and "5" not in msg.content[0].text
    with client.messages.stream(
        model=MODEL,
        max_tokens=40,
        messages=_ask("Count from 1 to 10, separated by spaces."),
        stop_sequences=["5"],
    ) as s:
        final = s.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == "5"


# -- tools -------------------------------------------------------------------------------------


def test_a_tool_round_trip(client):
    call = client.messages.create(
        model=MODEL, max_tokens=60, messages=QUESTION, tools=[WEATHER], tool_choice={"type": "any"}
    )
    assert call.stop_reason == "tool_use"
    (use,) = [b for b in call.content if b.type == "tool_use"]
    assert use.id.startswith("toolu_") and use.name == "get_weather"
    assert use.input["city"] == "Paris"
    # The SDK's own objects go back as the assistant turn; the result answers the call by id.
    # (The 0.5B model, still offered the tool, tends to call again: the answer is asked for
    # with tool_choice "none".)
    messages = [
        *QUESTION,
        {"role": "assistant", "content": call.content},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": use.id, "content": "31 degrees, sunny"}
            ],
        },
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=40, messages=messages, tools=[WEATHER], tool_choice={"type": "none"}
    )
    assert [b.type for b in answer.content] == ["text"]
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert "31" in answer.content[0].text


def test_a_streamed_tool_call_sends_its_input_as_json_deltas(server, client):
    body = {
        "model": MODEL,
        "max_tokens": 60,
        "stream": True,
        "messages": QUESTION,
        "tools": [WEATHER],
        "tool_choice": {"type": "tool", "name": "get_weather"},
    }
    with httpx.stream("POST", f"{server.url}/v1/messages", json=body, timeout=600) as r:
        frames = [data for _, data in _frames(r)]
    starts = [f for f in frames if f["type"] == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["tool_use"]
    block = starts[0]["content_block"]
    assert block["name"] == "get_weather" and block["input"] == {}
    assert block["id"].startswith("toolu_")
    pieces = [f["delta"] for f in frames if f["type"] == "content_block_delta"]
    assert {p["type"] for p in pieces} == {"input_json_delta"}
    assert json.loads("".join(p["partial_json"] for p in pieces))["city"] == "Paris"
    assert frames[-2]["delta"]["stop_reason"] == "tool_use"
    # and the SDK's accumulator reads the same stream into a tool_use block
    with client.messages.stream(**{k: v for k, v in body.items() if k != "stream"}) as s:
        final = s.get_final_message()
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and final.content[-1].input["city"] == "Paris"


def test_output_config_json_schema_gives_json_under_the_schema(client):
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    msg = client.messages.create(
        model=MODEL,
        max_tokens=40,
        messages=_ask("Lisbon is the capital of Portugal. Give the city and its country."),
        output_config={"format": {"type": "json_schema", "schema": schema}},
    )
    data = json.loads(msg.content[0].text)
    assert set(data) == {"city", "country"} and data["city"] == "Lisbon"


# -- count_tokens, models ------------------------------------------------------------------------


def test_count_tokens_is_the_prompt_a_reply_is_served_with(client):
    messages = [
        *QUESTION,
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me look."},
                {
                    "type": "tool_use",
                    "id": "toolu_1",
                    "name": "get_weather",
                    "input": {"city": "Paris"},
                },
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "12 degrees"},
                {"type": "text", "text": "And should I take a coat?"},
            ],
        },
    ]
    kwargs = {"model": MODEL, "system": "Be brief.", "messages": messages, "tools": [WEATHER]}
    counted = client.messages.count_tokens(**kwargs)
    msg = client.messages.create(max_tokens=1, **kwargs)
    # Anthropic counts the prompt as evaluated tokens plus those read from the cache
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert (
        counted.input_tokens
        > client.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens
    )
    # with tool_choice "none" the tools stay out of the prompt, in both
    kwargs["tool_choice"] = {"type": "none"}
    without = client.messages.count_tokens(**kwargs)
    msg = client.messages.create(max_tokens=1, **kwargs)
    assert without.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert without.input_tokens < counted.input_tokens


def test_a_task_name_is_a_model(client):
    msg = client.messages.create(model="chat", max_tokens=30, messages=_ask("Hi!"))
    assert msg.model == "chat" and msg.content[0].text.strip()
    label = client.messages.create(
        model="sentiment-en", max_tokens=5, messages=_ask("I love this phone, it is great.")
    )
    assert label.content[0].text == "positive" and label.stop_reason == "end_turn"
    with pytest.raises(anthropic.NotFoundError) as err:
        client.messages.create(model="no-such-model", max_tokens=5, messages=_ask("Hi"))
    assert err.value.body["error"]["type"] == "not_found_error"
    assert err.value.body["error"]["message"].startswith("model:")


# -- errors ------------------------------------------------------------------------------------


BAD = [
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    (
        {"messages": [{"role": "user", "content": [{"type": "document", "source": {}}]}]},
        "messages.0.content.0.type",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        "messages.0.content.0",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}
            ]
        },
        "messages.0.content.0.tool_use_id",
    ),
    ({"messages": [*_ask("Hi"), {"role": "assistant", "content": "Well,"}]}, "messages.1.role"),
    ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "thinking.type"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"extra_body": {"container": "c-1"}}, "container"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"extra_body": {"temperature": 1.5}}, "temperature"),
]


@pytest.mark.parametrize(("fields", "param"), BAD, ids=[p for _, p in BAD])
def test_bad_input_is_refused_naming_the_field(client, fields, param):
    kwargs = {"model": MODEL, "max_tokens": 5, "messages": _ask("Hi")} | fields
    with pytest.raises(anthropic.BadRequestError) as err:
        client.messages.create(**kwargs)
    body = err.value.body
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert body["error"]["message"].startswith(f"{param}: ")
    assert err.value.response.headers["x-should-retry"] == "false"


def test_missing_max_tokens_is_refused_and_the_server_serves_on(server, client):
    r = httpx.post(
        f"{server.url}/v1/messages", json={"model": MODEL, "messages": _ask("Hi")}, timeout=60
    )
    assert r.status_code == 400
    assert r.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "max_tokens: Field required"},
    }
    r = httpx.post(f"{server.url}/v1/messages", content=b"{not json", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    msg = client.messages.create(model=MODEL, max_tokens=5, messages=_ask("Hi"))
    assert msg.content[0].text


# -- API keys ------------------------------------------------------------------------------------


def test_x_api_key_and_bearer_keys(tiny_server):
    srv = tiny_server(ALLINONE_API_KEYS='["k1"]')
    body = {"model": "m", "messages": _ask("Hi")}
    url = f"{srv.url}/v1/messages/count_tokens"
    r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(url, json=body, headers={"x-api-key": "k1"}, timeout=60)
    assert r.status_code == 200 and r.json()["input_tokens"] > 0
    r = httpx.post(url, json=body, headers={"x-api-key": "nope"}, timeout=60)
    assert r.status_code == 401
    # the SDK sends its key as a bearer token
    with anthropic.Anthropic(base_url=srv.url, api_key="k1", max_retries=0, timeout=120) as c:
        assert c.messages.create(model="m", max_tokens=4, messages=_ask("Hi")).usage.output_tokens
    with (
        anthropic.Anthropic(base_url=srv.url, api_key="nope", max_retries=0) as c,
        pytest.raises(anthropic.AuthenticationError) as err,
    ):
        c.messages.count_tokens(model="m", messages=_ask("Hi"))
    assert err.value.body["error"]["type"] == "authentication_error"


def test_error_types_and_statuses_are_anthropic_s():
    import allinone.api  # noqa: F401 - the app first: a serving module cannot be imported first
    from allinone.errors import (
        GatewayTimeoutError,
        InvalidRequestError,
        NotReadyError,
        OverloadedError,
        PayloadTooLargeError,
    )
    from allinone.serving.messages import ANTHROPIC

    full = OverloadedError("the wait queue is full", headers={"Retry-After": "2"})
    r = ANTHROPIC.response(full)
    assert r.status_code == 529 and r.headers["retry-after"] == "2"
    assert json.loads(r.body)["error"]["type"] == "overloaded_error"
    loading = ANTHROPIC.response(NotReadyError("the model is loading"))
    assert loading.status_code == 503
    assert json.loads(loading.body)["error"]["type"] == "overloaded_error"
    for err, status, kind in [
        (GatewayTimeoutError("too slow"), 504, "timeout_error"),
        (PayloadTooLargeError("too big"), 413, "invalid_request_error"),
        (InvalidRequestError("bad", param="tools.0.name"), 400, "invalid_request_error"),
    ]:
        r = ANTHROPIC.response(err)
        body = json.loads(r.body)
        assert r.status_code == status and body["type"] == "error"
        assert body["error"]["type"] == kind
    assert body["error"]["message"] == "tools.0.name: bad"


def test_a_failure_mid_stream_ends_it_with_an_error_event(tiny_server):
    srv = tiny_server(ALLINONE_REQUEST_TIMEOUT_S="0.5")
    body = {
        "model": "m",
        "max_tokens": 4000,
        "stream": True,
        "messages": _ask("Write a very long story."),
    }
    with httpx.stream("POST", f"{srv.url}/v1/messages", json=body, timeout=60) as r:
        assert r.status_code == 200
        frames = _frames(r)
    assert frames[0][0] == "message_start"
    event, data = frames[-1]
    assert event == "error" and data["type"] == "error"
    assert data["error"]["type"] == "timeout_error"
    assert "message_stop" not in [e for e, _ in frames]
    # the SDK raises it
    with anthropic.Anthropic(base_url=srv.url, api_key="x", max_retries=0, timeout=60) as c:
        stream = c.messages.create(**body)
        with pytest.raises(anthropic.APIStatusError) as err:
            list(stream)
    assert err.value.body["error"]["type"] == "timeout_error"
