"""Hostile input, second round (issue #30), against a real server on loopback: strings that are
not text wherever they sit in a body, tool names, control tokens on /tokenize and /detokenize,
parallel tool calls and a forced call cut by ``max_tokens``."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

MODEL = "qwen-default"
JSON = {"content-type": "application/json"}
WEATHER = {
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
}
USER = rb'"messages": [{"role": "user", "content": "hi"}]'
HISTORY_CALL = (
    rb'"messages": [{"role": "user", "content": "weather?"}, {"role": "assistant", '
    rb'"content": null, "tool_calls": [{"id": "c1", "type": "function", "function": '
    rb'{"name": "get_weather", "arguments": %s}}]}, '
    rb'{"role": "tool", "tool_call_id": "c1", "content": "sunny"}]'
)
CHOICE = rb'"questions": [{"type": "choice", "instructions": "q", "choices": [%s]}]'
PREDICATE = rb'"questions": [{"type": "predicate", "instructions": "Is it?"}]'
NOUL = rb'"questions": {"q": {"type": "noul", "instructions": "Is it?"}}'

# (route, raw JSON body, the field's path in the error) -- a lone surrogate (a JSON escape, or
# its raw UTF-8 bytes) in a name, id, option value, key, free JSON, tool part, ignored field ...
SURROGATES = [
    ("/v1/decisions", rb'{"model": "jev-latest", "input": "x", '
     + CHOICE % rb'{"value": "\ud800"}, {"value": "b"}' + b"}",
     "questions[0].choices[0].value"),
    ("/v1/decisions", rb'{"model": "jev-latest", "input": [{"type": "message", "role": "user", '
     rb'"content": [{"type": "input_json", "data": {"k": ["\udfff"]}}]}], ' + PREDICATE + b"}",
     "input[0].content[0].data.k[0]"),
    ("/v1/decisions", rb'{"model": "jev-latest", "input": [{"type": "function_call", '
     rb'"call_id": "c", "name": "f", "arguments": "\ud800"}], ' + PREDICATE + b"}",
     "input[0].arguments"),
    ("/v1/decisions", rb'{"model": "jev-latest", "input": "x", "prompt_cache_key": "\ud800", '
     + PREDICATE + b"}", "prompt_cache_key"),
    ("/v1/systemone", rb'{"state": "x", "questions": {"q": {"type": "choice", '
     rb'"criteria": {"\ud800": "a", "b": "c"}}}}', "questions.q.criteria.\\ud800"),
    ("/v1/systemone", rb'{"state": {"k\ud800": 1}, ' + NOUL + b"}", "state.k\\ud800"),
    ("/v1/systemone", rb'{"state": "x", "questions": {"q": {"type": "score", '
     rb'"criteria": [{"a": "\udc00"}, "b"]}}}', "questions.q.criteria.0.a"),
    ("/v1/chat/completions", rb'{"model": "qwen-default", "metadata": {"\ud800": "x"}, '
     + USER + b"}", "metadata.\\ud800"),
    ("/v1/chat/completions", rb'{"model": "qwen-default", "user": "\ud800", ' + USER + b"}",
     "user"),
    ("/v1/chat/completions", rb'{"model": "qwen-default", "tools": [{"type": "function", '
     rb'"function": {"name": "f", "parameters": {"type": "object", "properties": '
     rb'{"\ud800": {"type": "string"}}}}}], ' + USER + b"}",
     "tools.0.function.parameters.properties.\\ud800"),
    ("/v1/chat/completions", rb'{"model": "qwen-default", "response_format": {"type": '
     rb'"json_schema", "json_schema": {"name": "x", "schema": {"enum": ["\ud800"]}}}, '
     + USER + b"}", "response_format.json_schema.schema.enum.0"),
    # the arguments' own JSON escapes: valid text outside, a lone surrogate once decoded
    ("/v1/chat/completions", rb'{"model": "qwen-default", '
     + HISTORY_CALL % rb'"{\"city\": \"\\ud800\"}"' + b"}",
     "messages.1.tool_calls.0.function.arguments"),
    ("/v1/chat/completions", rb'{"model": "qwen-default", "messages": [{"role": "user", '
     rb'"content": [{"type": "text", "text": "hi", "x\ud800": 1}]}]}',
     "messages.0.content.0.x\\ud800"),
    ("/v1/chat/completions", b'{"model": "qwen-default", "messages": [{"role": "user", '
     b'"content": "hi", "name": "a\xed\xa0\x80"}]}', "messages.0.name"),
    ("/v1/completions", rb'{"model": "qwen-default", "prompt": "hi", "max_tokens": 1, '
     rb'"logit_bias": {"\ud800": 1}}', "logit_bias.\\ud800"),
    ("/v1/classify", rb'{"task": "sentiment", "input": "x", "metadata": {"a": "\ud800"}}',
     "metadata.a"),
    ("/v1/decide", rb'{"task": "x", "input": "x", "extra\ud800": 1}', "extra\\ud800"),
    ("/tokenize", rb'{"content": "hi", "model": "\ud800"}', "model"),
    ("/detokenize", rb'{"tokens": [1], "model": "\ud800"}', "model"),
]  # fmt: skip


@pytest.fixture
def http(server):
    """One keep-alive connection for the whole test: a reply that leaves it broken shows."""
    with httpx.Client(base_url=server.url, timeout=120) as client:
        yield client


def _param(path: str, r: httpx.Response) -> str | None:
    """The field an error names, in the route family's own shape."""
    body = r.json()
    if path == "/v1/systemone":  # TypeSafe's 422: FastAPI's detail list
        return ".".join(str(p) for p in body["detail"][0]["loc"][1:])
    return body["error"]["param"]


@pytest.mark.parametrize(("path", "raw", "param"), SURROGATES, ids=[s[2] for s in SURROGATES])
def test_a_lone_surrogate_anywhere_is_refused_by_name(http, path, raw, param):
    r = http.post(path, content=raw, headers=JSON)
    assert r.status_code == (422 if path == "/v1/systemone" else 400), r.text
    assert _param(path, r) == param
    assert "surrogate" in r.text
    assert http.get("/health").status_code == 200  # same connection, still open


def test_paired_surrogate_escapes_are_text(http):
    r = http.post(
        "/v1/chat/completions",
        content=rb'{"model": "qwen-default", "max_tokens": 2, "metadata": {"\ud83d\ude00": 1}, '
        rb'"messages": [{"role": "user", "content": "hi \ud83d\ude00"}]}',
        headers=JSON,
    )
    assert r.status_code == 200, r.text


def test_a_choice_question_with_no_criteria_is_refused(http):
    body = {"state": "x", "questions": {"q": {"type": "choice", "criteria": {}}}}
    r = http.post("/v1/systemone", json=body)
    assert r.status_code == 422
    assert r.json()["detail"][0]["loc"][-1] == "criteria"


@pytest.mark.parametrize("where", ["history", "tools", "tool_choice", "json_schema", "decisions"])
def test_a_tool_name_with_a_space_gets_one_rule_everywhere(http, where):
    tool = {"type": "function", "function": {"name": "get weather"}}
    ask = [{"role": "user", "content": "weather?"}]
    call = {"id": "c1", "type": "function", "function": {"name": "get weather", "arguments": "{}"}}
    path, param = "/v1/chat/completions", None
    body: dict = {"model": MODEL, "messages": ask, "max_tokens": 2}
    if where == "history":
        body["messages"] = [*ask, {"role": "assistant", "tool_calls": [call]}]
        body["messages"].append({"role": "tool", "tool_call_id": "c1", "content": "sunny"})
        param = "messages.1.tool_calls.0.function.name"
    elif where == "tools":
        body["tools"], param = [tool], "tools.0.function.name"
    elif where == "tool_choice":
        body["tools"] = [WEATHER]
        body["tool_choice"] = {"type": "function", "function": {"name": "get weather"}}
        param = "tool_choice.function.name"
    elif where == "json_schema":
        schema = {"name": "get weather", "schema": {"type": "object"}}
        body["response_format"] = {"type": "json_schema", "json_schema": schema}
        param = "response_format.json_schema.name"
    else:
        path, param = "/v1/decisions", "input[0].name"
        item = {"type": "function_call", "call_id": "c", "name": "get weather", "arguments": "{}"}
        body = {"model": MODEL, "input": [item], "questions": [{"type": "predicate"}]}
        body["questions"][0]["instructions"] = "Is it sunny?"
    r = http.post(path, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param
    assert "1 to 64 letters" in err["message"] and "'get weather'" in err["message"]
    assert http.get("/health").status_code == 200


# -- control tokens on /tokenize and /detokenize -------------------------------------------------
def test_detokenize_writes_control_tokens_as_their_text(http):
    text = "<|im_start|>user\nhi<|im_end|>"
    tok = http.post("/tokenize", json={"content": text, "add_special": True, "with_pieces": True})
    assert tok.status_code == 200
    body = tok.json()
    assert body["pieces"][0] == "<|im_start|>" and body["pieces"][-1] == "<|im_end|>"
    assert "".join(body["pieces"]) == text
    start = body["tokens"][0]
    assert http.post("/detokenize", json={"tokens": [start]}).json()["content"] == "<|im_start|>"
    back = http.post("/detokenize", json={"tokens": body["tokens"]}).json()
    assert back["content"] == back["prompt"] == text


@pytest.mark.parametrize("bad", [-1, 2**31, 2**64, True, "5", 1.5])
def test_detokenize_refuses_what_is_not_a_token_id(http, bad):
    r = http.post("/detokenize", json={"tokens": [0, bad]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith("tokens")


# -- parallel tool calls and a forced call cut short --------------------------------------------
@pytest.fixture
def client(server):
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0) as c:
        yield c


def _two_calls_prompt() -> list[dict]:
    # One worked turn shows the model the array form; it answers the next one the same way
    # (deterministic at temperature 0). Before the fix such a reply came back as content.
    shot = [
        {"name": "get_weather", "arguments": {"city": "Oslo"}},
        {"name": "get_weather", "arguments": {"city": "Lima"}},
    ]
    return [
        {"role": "user", "content": "Weather in Oslo and Lima?"},
        {"role": "assistant", "content": json.dumps(shot)},
        {"role": "user", "content": "Weather in Paris and Rome?"},
    ]


def test_parallel_calls_have_their_own_index_and_id(client):
    ask = {"model": MODEL, "messages": _two_calls_prompt(), "tools": [WEATHER]}
    done = client.chat.completions.create(**ask, temperature=0, max_tokens=80)
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    assert len({c.id for c in calls}) == 2

    streamed: dict[int, dict] = {}
    reasons = []
    for chunk in client.chat.completions.create(**ask, temperature=0, max_tokens=80, stream=True):
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            assert not ch.delta.content
            for d in ch.delta.tool_calls or []:
                entry = streamed.setdefault(d.index, {"id": "", "arguments": ""})
                entry["id"] += d.id or ""
                entry["arguments"] += d.function.arguments or ""
    assert sorted(streamed) == [0, 1] and reasons[-1] == "tool_calls"
    assert [json.loads(streamed[i]["arguments"])["city"] for i in (0, 1)] == ["Paris", "Rome"]
    assert streamed[0]["id"] != streamed[1]["id"]

    one = client.chat.completions.create(
        **ask, temperature=0, max_tokens=80, parallel_tool_calls=False
    )
    assert len(one.choices[0].message.tool_calls) == 1


@pytest.mark.parametrize("max_tokens", [1, 4, 16])
def test_a_forced_call_cut_by_max_tokens_is_no_call_and_no_markup(client, max_tokens):
    ask = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
        "tools": [WEATHER],
        "tool_choice": "required",
        "max_tokens": max_tokens,
    }
    done = client.chat.completions.create(**ask)
    choice = done.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content is None and choice.message.tool_calls is None
    assert done.usage.completion_tokens == max_tokens

    content, calls, reasons = "", [], []
    for chunk in client.chat.completions.create(**ask, stream=True):
        for ch in chunk.choices:
            content += ch.delta.content or ""
            calls += ch.delta.tool_calls or []
            reasons.append(ch.finish_reason)
    assert content == "" and calls == [] and reasons[-1] == "length"


def test_history_arguments_nested_past_the_decoders_limit_are_refused_by_name(http):
    deep = "[" * 1100 + "]" * 1100
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": deep}}
    messages = [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    body = {"model": MODEL, "messages": messages, "max_tokens": 2, "tools": [WEATHER]}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages.1.tool_calls.0.function.arguments"
    assert http.get("/health").status_code == 200
