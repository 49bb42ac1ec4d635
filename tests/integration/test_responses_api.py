"""OpenAI's Responses API (``POST /v1/responses``), driven by the openai SDK's
``client.responses`` against a real server on loopback with the default model: text, a
conversation sent back with the earlier output, the stream's events in order, JSON under a
schema, function calls (a full round trip, and streamed), a task as the model, log-probabilities,
a failure mid-stream, and fields the server cannot honour refused by name in OpenAI's envelope."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

MODEL = "qwen-default"
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city name"}},
        "required": ["city"],
    },
    "strict": None,
}
ADD = {
    "type": "function",
    "name": "add",
    "description": "Add two integers",
    "parameters": {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    },
    "strict": True,
}
TEXT_TURN = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]
CALL_TURN = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.function_call_arguments.delta",
    "response.function_call_arguments.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)


def _collapsed(types: list[str]) -> list[str]:
    """Event types with each run of text deltas as one."""
    out: list[str] = []
    for t in types:
        if not (out and out[-1] == t and t.endswith(".delta")):
            out.append(t)
    return out


def test_a_reply_and_a_follow_up_that_sends_the_output_back(client):
    first = client.responses.create(
        model=MODEL,
        instructions="You are a friendly assistant.",
        input="My name is Ana. Greet me in one short sentence.",
        max_output_tokens=30,
        temperature=0,
    )
    assert first.status == "completed" and first.object == "response"
    assert first.id.startswith("resp_") and first.model == MODEL
    (message,) = first.output
    assert message.type == "message" and message.id.startswith("msg_")
    assert message.content[0].annotations == []
    assert first.output_text.strip()
    usage = first.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert first.instructions == "You are a friendly assistant."
    assert first.temperature == 0 and first.max_output_tokens == 30
    # The stateless way to continue: the earlier input and output, then the next message.
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": "My name is Ana. Greet me in one short sentence."},
            *first.output,
            {"role": "user", "content": [{"type": "input_text", "text": "What is my name?"}]},
        ],
        max_output_tokens=20,
        temperature=0,
    )
    assert "Ana" in second.output_text


def test_a_length_stop_is_incomplete_with_its_reason(client):
    r = client.responses.create(
        model=MODEL, input="Count from 1 to 50, separated by commas.", max_output_tokens=4
    )
    assert r.status == "incomplete"
    assert r.incomplete_details.reason == "max_output_tokens"
    assert r.output[0].status == "incomplete" and r.usage.output_tokens == 4


def test_a_streamed_reply_comes_as_the_spec_orders_its_events(client):
    stream = client.responses.create(
        model=MODEL, input="What is the capital of France?", max_output_tokens=40, stream=True
    )
    events = list(stream)
    assert _collapsed([e.type for e in events]) == TEXT_TURN
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    assert all(e.logprobs == [] for e in deltas)
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    final = events[-1].response
    assert "".join(e.delta for e in deltas) == done.text == final.output_text
    assert "Paris" in final.output_text
    assert final.status == "completed" and final.usage.output_tokens > 0
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[0].response.id == final.id
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
    assert item_ids == {final.output[0].id}


class City(BaseModel):
    name: str
    country: str
    population_millions: float = Field(ge=0)


def test_text_format_json_schema_answers_json_under_the_schema(client):
    schema = {**City.model_json_schema(), "additionalProperties": False}
    r = client.responses.create(
        model=MODEL,
        input="Lisbon, the capital of Portugal, has about 0.5 million people.",
        text={"format": {"type": "json_schema", "name": "city", "schema": schema}},
        max_output_tokens=60,
    )
    assert r.status == "completed"
    jsonschema.validate(json.loads(r.output_text), schema)
    assert r.text.format.type == "json_schema" and r.text.format.name == "city"
    # The SDK's own structured-output helper (strict schema) parses what comes back.
    parsed = client.responses.parse(
        model=MODEL,
        input="Tokyo, the capital of Japan, has about 14 million people.",
        text_format=City,
        max_output_tokens=60,
    )
    assert isinstance(parsed.output_parsed, City) and parsed.output_parsed.country == "Japan"


def test_a_function_call_round_trip(client):
    question = "What is the weather in Paris?"
    first = client.responses.create(
        model=MODEL, input=question, tools=[WEATHER], max_output_tokens=60
    )
    (call,) = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed"
    assert json.loads(call.arguments)["city"] == "Paris"
    assert first.status == "completed" and first.tools[0].name == "get_weather"
    # The result goes back as a function_call_output; the 0.5B model, still offered the tool,
    # tends to call again, so the answer is asked for with tool_choice "none" (as on chat).
    second = client.responses.create(
        model=MODEL,
        input=[
            {"role": "user", "content": question},
            *first.output,
            {
                "type": "function_call_output",
                "call_id": call.call_id,
                "output": "31 degrees celsius, sunny",
            },
        ],
        tools=[WEATHER],
        tool_choice="none",
        max_output_tokens=60,
    )
    assert [item.type for item in second.output] == ["message"]
    assert "31" in second.output_text


def test_a_streamed_function_call_is_its_own_item(client):
    stream = client.responses.create(
        model=MODEL,
        input="Add 2 and 3 with the tool.",
        tools=[WEATHER, ADD],
        tool_choice={"type": "function", "name": "add"},
        max_output_tokens=60,
        stream=True,
    )
    events = list(stream)
    assert [e.type for e in events] == CALL_TURN
    added, done = events[2].item, events[5].item
    assert added.type == "function_call" and added.arguments == "" and added.name == "add"
    assert added.status == "in_progress" and done.status == "completed"
    assert events[3].delta == events[4].arguments == done.arguments
    assert set(json.loads(done.arguments)) == {"a", "b"}
    assert events[-1].response.output[0].call_id == done.call_id


def test_a_task_name_as_the_model(client):
    r = client.responses.create(model="sentiment-en", input="I absolutely love this phone!")
    assert r.model == "sentiment-en" and r.output_text == "positive"
    streamed = list(client.responses.create(model="sentiment-en", input="Awful.", stream=True))
    assert streamed[-1].response.output_text == "negative"


def test_logprobs_come_when_included(client):
    r = client.responses.create(
        model=MODEL,
        input="Say yes.",
        include=["message.output_text.logprobs"],
        top_logprobs=2,
        max_output_tokens=3,
    )
    part = r.output[0].content[0]
    assert part.logprobs and all(len(lp.top_logprobs) == 2 for lp in part.logprobs)
    assert "".join(lp.token for lp in part.logprobs) == part.text
    assert all(lp.logprob <= 0 for lp in part.logprobs)


BAD = [
    # (body fields over {"model", "input"}, status, param)
    ({"reasoning": {"effort": "low"}}, 400, "reasoning"),
    ({"previous_response_id": "resp_123"}, 400, "previous_response_id"),
    ({"store": True}, 400, "store"),
    ({"background": True}, 400, "background"),
    ({"input": None}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, 400, "input.0.type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.0.type"),
    (
        {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
        400,
        "input.0.content.0.type",
    ),
    (
        {"input": [{"type": "function_call_output", "call_id": "call_9", "output": "1"}]},
        400,
        "input.0.call_id",
    ),
    (
        {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]},
        400,
        "input.0.arguments",
    ),
    ({"tools": [WEATHER, {"type": "web_search"}]}, 400, "tools.1.type"),
    ({"tools": [{**WEATHER, "name": "get weather"}]}, 400, "tools.0.name"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
    ({"tool_choice": {"type": "file_search"}, "tools": [WEATHER]}, 400, "tool_choice.type"),
    (
        {
            "tools": [WEATHER],
            "tool_choice": "required",
            "text": {"format": {"type": "json_object"}},
        },
        400,
        "text.format",
    ),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, 400, "text.format"),
    ({"text": {"verbosity": "high"}}, 400, "text.verbosity"),
    ({"frobnicate": 1}, 400, "frobnicate"),
    ({"model": "gpt-5"}, 404, "model"),
    ({"model": "sentiment-en", "instructions": "Be nice."}, 400, "instructions"),
]


@pytest.mark.parametrize(("fields", "status", "param"), BAD, ids=[p for _, _, p in BAD])
def test_bad_input_is_refused_by_name_in_openais_envelope(server, fields, status, param):
    body = {"model": MODEL, "input": "hi", **fields}
    body = {k: v for k, v in body.items() if v is not None}
    r = httpx.post(f"{server.url}/v1/responses", json=body, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param, error
    assert error["type"] == ("invalid_request_error" if status == 400 else "not_found_error")
    assert error["message"]


def test_the_sdk_raises_bad_request_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.responses.create(model=MODEL, input="hi", reasoning={"effort": "high"})
    assert err.value.body["param"] == "reasoning"
    assert "does not reason" in err.value.body["message"]
    r = client.responses.create(model=MODEL, input="Say OK.", max_output_tokens=5)
    assert r.status in ("completed", "incomplete") and r.output_text


def test_a_failure_mid_stream_ends_it_with_error_and_response_failed(tiny_server):
    srv = tiny_server(ALLINONE_REQUEST_TIMEOUT_S="0.5")
    tiny = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
    stream = tiny.responses.create(
        model="m", input="Write a very long story.", max_output_tokens=4000, stream=True
    )
    events = list(stream)
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    error, failed = events[-2:]
    assert error.type == "error" and error.code == "timeout"
    assert failed.type == "response.failed" and failed.response.status == "failed"
    assert failed.response.error.message == error.message
    assert [e.sequence_number for e in events] == list(range(len(events)))
