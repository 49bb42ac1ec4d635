"""Hostile input to the engine and its sampler (issue #30, second round), against real models:
every request shape is planned or refused at admission and a request that fails while its step
is planned fails alone; logit_bias keys are token ids in ASCII digits; a grammar that cannot
finish ends the reply as cut, never as an engine failure; logprobs spell exactly the returned
text; top_k, min_p and repetition_penalty are honoured (or refused by name where a backend
cannot honour them)."""

from __future__ import annotations

import json
import re

import httpx
import openai
import pytest

from allinone.backends.base import (
    BackendError,
    GenerationParams,
    Prompt,
    RequestHandle,
    ScoreBranch,
    Segment,
)
from allinone.backends.llama_cpp.request import Request
from allinone.server_process import ServerProcess
from allinone.serving.errors import InputError

MODEL = "qwen-default"
SYSTEM = (Segment("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n", special=True),)


def _ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _turn(text: str) -> tuple[Segment, ...]:
    return (
        Segment("<|im_start|>user\n", special=True),
        Segment(text),
        Segment("<|im_end|>\n<|im_start|>assistant\n", special=True),
    )


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=600)


def _still_serving(server) -> None:
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": MODEL, "prompt": "The capital of France is", "max_tokens": 2},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert httpx.get(server.url + "/health", timeout=10).json()["ready"]


def _engine_failed(server) -> float:
    text = httpx.get(server.url + "/metrics", timeout=30).text
    m = re.search(r"^allinone_engine_failed_total(?:\{[^}]*\})? (\S+)$", text, re.M)
    assert m is not None, "allinone_engine_failed_total is not in /metrics"
    return float(m.group(1))


# -- 1: every request shape is planned or refused at admission --------------------------------


@pytest.mark.parametrize("prompt", ["", [""]])
def test_an_empty_completion_prompt_starts_from_bos_and_the_server_keeps_serving(server, prompt):
    failed = _engine_failed(server)
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8}
    r = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    done = r.json()
    assert done["choices"][0]["finish_reason"] in ("stop", "length")
    assert done["usage"]["prompt_tokens"] == 1  # the BOS token
    with httpx.stream(
        "POST", server.url + "/v1/completions", json={**body, "stream": True}, timeout=120
    ) as s:
        assert s.status_code == 200
        events = [x.removeprefix("data: ") for x in s.iter_lines() if x.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert all("error" not in json.loads(e) for e in events[:-1])
    _still_serving(server)
    assert _engine_failed(server) == failed


def test_a_request_with_no_tokens_is_refused_at_admission(tiny_backend_factory):
    backend = tiny_backend_factory()
    loop = backend._loop()
    empty = Request(
        kind="generate", handle=RequestHandle(), prefix_key=(), prefix_tokens=[], body_tokens=[]
    )
    with pytest.raises(InputError) as refused:
        loop.submit(empty)
    assert refused.value.param == "prompt"
    with pytest.raises(InputError):  # a scoring request has no BOS to fall back on
        backend.score_choices(Prompt((), ()), ["yes", "no"])
    fin = backend.generate(Prompt((), (Segment("Hello"),)), GenerationParams(max_tokens=4))
    assert fin.result(timeout=120).usage.completion_tokens > 0
    assert backend.health()
    loop.check_invariants()


def test_a_one_token_prompt_is_generated_from(tiny_backend_factory):
    backend = tiny_backend_factory()
    assert len(backend.tokenize("Hello")) == 1
    fin = backend.generate(Prompt((), (Segment("Hello"),)), GenerationParams(max_tokens=4))
    assert fin.result(timeout=120).usage.prompt_tokens == 1
    backend._loop().check_invariants()


@pytest.mark.parametrize("reuse", [True, False])
def test_a_prompt_that_is_exactly_a_cached_prefix_is_planned(tiny_backend_factory, reuse):
    backend = tiny_backend_factory(reuse_slots=reuse)
    params = GenerationParams(max_tokens=6)
    first = backend.generate(Prompt(SYSTEM, _turn("Say hi.")), params).result(timeout=120)
    assert first.reason in ("stop", "length")
    assert backend.stats()["cached_prefixes"] == 1
    # The whole prompt is the cached prefix: no body left to evaluate.
    fin = backend.generate(Prompt(SYSTEM, ()), params).result(timeout=120)
    assert fin.usage.prompt_tokens == len(backend.tokenize(SYSTEM[0].text, special=True))
    assert fin.usage.cached_tokens == fin.usage.prompt_tokens - 1  # the last one evaluated again
    # the same for a scoring request and for a branch request whose branch has no suffix
    scores = backend.score_choices(Prompt(SYSTEM, ()), ["yes", "no"]).result(timeout=120)
    assert len(scores.result) == 2
    branches = [ScoreBranch((), ("yes", "no")), ScoreBranch((Segment("Is it?"),), ("yes", "no"))]
    nested = backend.score_branches(Prompt(SYSTEM, ()), branches).result(timeout=120)
    assert [len(x) for x in nested.result] == [2, 2]
    assert backend.health()
    backend._loop().check_invariants()


def test_a_fully_reused_chat_and_branches_with_empty_suffixes(tiny_backend_factory):
    backend = tiny_backend_factory()  # slot reuse and the host-memory prompt cache on
    prompt = Prompt(SYSTEM, _turn("Tell me about the sea. " * 12))
    params = GenerationParams(max_tokens=8)
    first = backend.generate(prompt, params).result(timeout=120)
    again = backend.generate(prompt, params).result(timeout=120)  # identical to cached cells
    assert again.result == first.result
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
    # a branch request whose every branch has an empty suffix (labels read where the body ends)
    empty = [ScoreBranch((), ("yes", "no")), ScoreBranch((), ("maybe", "never"))]
    nested = backend.score_branches(prompt, empty).result(timeout=120)
    assert [len(x) for x in nested.result] == [2, 2]
    assert backend.health()
    backend._loop().check_invariants()


def test_a_request_that_fails_while_its_step_is_planned_fails_alone(
    tiny_backend_factory, monkeypatch
):
    backend = tiny_backend_factory()
    rt = backend.rt
    poison = backend.tokenize(" Zqxjwv")[-1]
    other = Prompt((), (Segment("Once upon a time, in a small village,"),))
    assert poison not in backend.tokenize(other.body[0].text)
    real = rt.batch_add

    def batch_add(token, pos, seq, logits):
        if token == poison:
            raise RuntimeError("planted failure while planning")
        return real(token, pos, seq, logits)

    monkeypatch.setattr(rt, "batch_add", batch_add)
    survivor = backend.generate(other, GenerationParams(max_tokens=24))
    victim = backend.generate(
        Prompt((), (Segment("Some words and then Zqxjwv and more"),)), GenerationParams()
    )
    with pytest.raises(BackendError):
        victim.result(timeout=120)
    fin = survivor.result(timeout=120)
    assert fin.usage.completion_tokens > 0
    monkeypatch.undo()
    assert backend.health()
    assert backend.generate(other, GenerationParams(max_tokens=2)).result(timeout=120)
    backend._loop().check_invariants()


# -- 4: logit_bias keys ---------------------------------------------------------------------


BAD_KEYS = ["²", "٣", " 5", "5 ", "+5", "-1", "05", "1" * 5000, "1" * 11, "", "5\n", "0x10"]


@pytest.mark.parametrize("key", BAD_KEYS)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_logit_bias_keys_are_token_ids_in_ascii_digits(server, route, key):
    body = (
        {"model": MODEL, "messages": _ask("hi"), "max_tokens": 2}
        if route == "/v1/chat/completions"
        else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    r = httpx.post(server.url + route, json={**body, "logit_bias": {key: 5}}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"101"])
def test_logit_bias_values_are_finite_and_in_range(server, raw):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, '
    body = (body % MODEL.encode()) + b'"logit_bias": {"5": ' + raw + b"}}"
    r = httpx.post(
        server.url + "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "logit_bias"


def test_logit_bias_ids_beyond_the_vocabulary_are_refused_by_name(server):
    body = {"model": MODEL, "messages": _ask("hi"), "max_tokens": 2}
    r = httpx.post(
        server.url + "/v1/chat/completions",
        json={**body, "logit_bias": {"9999999999": 5, "0": 1}},
        timeout=60,
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "logit_bias", r.text
    ok = httpx.post(
        server.url + "/v1/chat/completions", json={**body, "logit_bias": {"0": 1}}, timeout=60
    )
    assert ok.status_code == 200, ok.text


# -- 5: a grammar that cannot finish --------------------------------------------------------

ENDLESS = {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}


@pytest.mark.parametrize(
    "schema",
    [{"$defs": {"n": {"$ref": "#/$defs/n"}}, "$ref": "#/$defs/n"}, {"allOf": [{"$ref": "#"}]}],
)
def test_a_schema_that_is_only_a_reference_to_itself_is_refused(client, schema):
    # it admits no JSON value: the reply would be an empty "success" (finish_reason stop)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=_ask("Give me some JSON."),
            max_tokens=8,
            response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema}},
        )
    assert refused.value.body["param"] == "response_format"
    assert "empty reply" in refused.value.body["message"]


def test_a_schema_with_no_finite_instance_is_refused_or_cut_never_an_engine_failure(server, client):
    failed = _engine_failed(server)
    # Its every instance is endless and the grammar forces it from the start: refused up front.
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=_ask("Give me some JSON."),
            max_tokens=48,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "endless", "schema": ENDLESS},
            },
        )
    assert refused.value.body["param"] == "response_format"
    assert "never ends" in refused.value.body["message"]
    # As a tool's parameters the JSON may take whitespace, so nothing is forced: the call is
    # cut at max_tokens.
    tool = {
        "type": "function",
        "function": {"name": "nest", "description": "Nest forever", "parameters": ENDLESS},
    }
    done = client.chat.completions.create(
        model=MODEL,
        messages=_ask("Call nest."),
        tools=[tool],
        tool_choice="required",
        max_tokens=48,
    )
    assert done.choices[0].finish_reason == "length"
    assert _engine_failed(server) == failed
    _still_serving(server)


def test_a_grammar_that_gives_up_mid_reply_ends_it_as_cut(default_backend):
    # The compile-time check refuses ENDLESS; built without it, the engine meets the dead end
    # while generating, as with a schema whose endless branch is only reached mid-reply.
    from llguidance import LLMatcher

    from allinone.backends.llama_cpp.grammar import TokenGrammar

    compiler = default_backend._compiler()
    source = LLMatcher.grammar_from_json_schema(
        json.dumps(ENDLESS), defaults={"whitespace_flexible": False}
    )
    grammar = TokenGrammar(compiler.tokenizer(), source, compiler.n_vocab)
    failed = default_backend.stats()["failed"]
    prompt = Prompt((), _turn("Give me some JSON."))
    fin = default_backend.generate(prompt, GenerationParams(max_tokens=64, grammar=grammar))
    done = fin.result(timeout=120)
    assert done.reason == "length"
    assert default_backend.stats()["failed"] == failed
    assert default_backend.health()
    default_backend._loop().check_invariants()


# -- 8: logprobs spell exactly the returned text ----------------------------------------------


def _spelled(entries) -> bytes:
    return b"".join(bytes(e.bytes) for e in entries)


def test_chat_logprobs_stop_where_a_stop_string_cuts_the_reply(client):
    ask = dict(
        model=MODEL,
        messages=_ask("Count from 1 to 10, separated by spaces. Only the numbers."),
        max_tokens=40,
        stop=["7"],
        logprobs=True,
        top_logprobs=2,
    )
    done = client.chat.completions.create(**ask)
    content = done.choices[0].message.content
    assert content.startswith("1 2 3") and "7" not in content
    entries = done.choices[0].logprobs.content
    assert "".join(e.token for e in entries) == content
    assert _spelled(entries) == content.encode()
    text, streamed = "", []
    for chunk in client.chat.completions.create(**ask, stream=True):
        if not chunk.choices:
            continue
        text += chunk.choices[0].delta.content or ""
        if chunk.choices[0].logprobs is not None:
            streamed += chunk.choices[0].logprobs.content
    assert text == content
    assert _spelled(streamed) == content.encode()


def test_chat_task_logprobs_stop_at_its_character_cap(client):
    ask = dict(
        model="chat",
        messages=_ask("Describe the Great Wall of China in detail, in English."),
        logprobs=True,
    )
    done = client.chat.completions.create(**ask)
    content = done.choices[0].message.content
    assert len(content) == 60 and done.choices[0].finish_reason == "length"
    assert _spelled(done.choices[0].logprobs.content) == content.encode()
    text, streamed = "", []
    for chunk in client.chat.completions.create(**ask, stream=True):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            if chunk.choices[0].logprobs is not None:
                streamed += chunk.choices[0].logprobs.content
    assert text == content and _spelled(streamed) == content.encode()


def test_completion_logprobs_cover_exactly_the_text(client):
    ask = dict(model=MODEL, prompt="1, 2, 3, 4,", max_tokens=30, stop=[" 8"], logprobs=1)
    done = client.completions.create(**ask)
    text = done.choices[0].text
    assert text.startswith(" 5, 6, 7") and "8" not in text
    assert "".join(done.choices[0].logprobs.tokens) == text
    offsets = done.choices[0].logprobs.text_offset
    assert offsets == sorted(offsets) and offsets[-1] < len(text)
    streamed_text, tokens = "", []
    for chunk in client.completions.create(**ask, stream=True):
        if chunk.choices:
            streamed_text += chunk.choices[0].text
            if chunk.choices[0].logprobs is not None:
                tokens += chunk.choices[0].logprobs.tokens
    assert streamed_text == text and "".join(tokens) == text


def test_a_token_cut_in_the_middle_keeps_only_its_returned_part(default_backend):
    prompt = Prompt((), (Segment("The quick brown fox jumps over the lazy"),))
    params = dict(max_tokens=12, logprobs=True, seed=0)  # seeded: the same logits each time
    free = default_backend.generate(prompt, GenerationParams(**params)).result(timeout=120)
    # a token of several characters that is not the first, and where its text first appears
    at, cut = 0, None
    for e in free.logprobs:
        piece = e.token.decode()
        if at and len(piece.strip()) >= 3 and free.result.find(piece[2:]) == at + 2:
            cut = (at, piece)
            break
        at += len(piece)
    assert cut is not None, free.result
    at, piece = cut
    fin = default_backend.generate(prompt, GenerationParams(stop=[piece[2:]], **params)).result(
        timeout=120
    )
    assert fin.result == free.result[: at + 2]
    assert b"".join(e.token for e in fin.logprobs) == fin.result.encode()
    assert fin.logprobs[-1].token == piece[:2].encode()  # the straddling token, cut
    assert fin.logprobs[-1].logprob == free.logprobs[len(fin.logprobs) - 1].logprob


# -- 13: top_k, min_p, repetition_penalty -----------------------------------------------------


def _reply(client, **kw) -> str:
    done = client.chat.completions.create(
        model=MODEL, messages=_ask("Write a short poem about the moon."), max_tokens=24, **kw
    )
    return done.choices[0].message.content


def test_top_k_and_min_p_of_one_are_greedy_at_temperature_one(client):
    # Every request is seeded: a seeded request starts from the layout of an idle engine, so
    # the logits, and the greedy reply, do not depend on what ran before (docs/limits.md).
    greedy = _reply(client, temperature=0, seed=1)
    for extra in ({"top_k": 1}, {"min_p": 1.0}, {"top_k": 1, "min_p": 0.5}):
        for seed in (1, 2):
            assert _reply(client, temperature=1.0, seed=seed, extra_body=extra) == greedy
    # "off" values change nothing (vLLM's clients send top_k -1)
    off = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    assert _reply(client, temperature=0, seed=1, extra_body=off) == greedy
    assert _reply(client, temperature=0, seed=1, extra_body={"top_k": 0}) == greedy


def test_a_large_repetition_penalty_changes_a_repetitive_reply(client):
    ask = _ask("Repeat the word 'dog' twenty times, separated by spaces.")
    plain = client.chat.completions.create(model=MODEL, messages=ask, max_tokens=30)
    text = plain.choices[0].message.content
    assert text.lower().count("dog") >= 10
    penalised = client.chat.completions.create(
        model=MODEL, messages=ask, max_tokens=30, extra_body={"repetition_penalty": 3.0}
    )
    assert penalised.choices[0].message.content.lower().count("dog") < text.lower().count("dog")
    prompt = "dog, dog, dog, dog, dog,"
    done = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12)
    pen = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=12, extra_body={"repetition_penalty": 5.0}
    )
    assert done.choices[0].text.count("dog") >= 4
    assert pen.choices[0].text.count("dog") < done.choices[0].text.count("dog")


@pytest.mark.parametrize(
    "field,value",
    [
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_k", 2**40),
        ("min_p", -0.1),
        ("min_p", 1.5),
        ("repetition_penalty", 0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", 1e9),
    ],
)
@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_sampling_fields_out_of_range_are_refused_by_name(server, route, field, value):
    body = (
        {"model": MODEL, "messages": _ask("hi"), "max_tokens": 2}
        if route == "/v1/chat/completions"
        else {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    )
    r = httpx.post(server.url + route, json={**body, field: value}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == field


def test_sampling_fields_a_label_task_cannot_use_are_refused(server):
    body = {"model": "sentiment", "messages": _ask("great"), "top_k": 5}
    r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_k", r.text


def test_a_backend_that_cannot_honour_them_refuses_them_by_name(tiny_server):
    upstream = tiny_server()
    front = ServerProcess(
        "default", {"ALLINONE_BACKEND": "openai", "ALLINONE_UPSTREAM": upstream.url}
    )
    try:
        front.wait_ready()
        c = openai.OpenAI(base_url=front.url + "/v1", api_key="x", max_retries=0, timeout=120)
        for field, value in (("top_k", 5), ("min_p", 0.1), ("repetition_penalty", 1.3)):
            with pytest.raises(openai.BadRequestError) as chat:
                c.chat.completions.create(
                    model="m", messages=_ask("hi"), max_tokens=2, extra_body={field: value}
                )
            assert chat.value.body["param"] == field
            with pytest.raises(openai.BadRequestError) as legacy:
                c.completions.create(
                    model="m", prompt="hi", max_tokens=2, extra_body={field: value}
                )
            assert legacy.value.body["param"] == field
        # their "off" values are no request to honour
        off = {"top_k": -1, "min_p": 0, "repetition_penalty": 1}
        ok = c.chat.completions.create(model="m", messages=_ask("hi"), max_tokens=2, extra_body=off)
        assert ok.choices[0].finish_reason in ("stop", "length")
    finally:
        front.stop()
