"""Legacy text completions (``POST /v1/completions``, plain and streamed) and the tokenizer
routes (``POST /tokenize``, ``POST /detokenize``, in llama.cpp's server and vLLM's shapes).

A completion's prompt is raw text for the model, with control-token markup parsed (as
llama.cpp's server and vLLM do): evaluation tools send templated prompts themselves."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Request
from pydantic import BaseModel, Field, StrictInt, model_validator

from allinone.api.dialects import dialect_router
from allinone.api.protocol import (
    NoEffectFields,
    SamplingFields,
    StreamOptions,
    Text,
    UsageInfo,
)
from allinone.api.state import Server
from allinone.backends.base import GenerationParams, Prompt, Segment
from allinone.errors import envelope, to_api_error
from allinone.serving.errors import InputError
from allinone.serving.models import resolve_model
from allinone.serving.scope import Done, LogprobsDelta, RequestScope, TextDelta
from allinone.serving.sse import DONE, event_stream, sse

router = dialect_router(tags=["openai"])


class CompletionRequest(SamplingFields):
    """POST /v1/completions (OpenAI's legacy API); one prompt, one choice."""

    model: Text = Field(min_length=1, description="The served model's id")
    prompt: Text | list[Text] = Field(description="The text to continue (a list of one)")
    max_tokens: int = Field(16, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request")
    best_of: int = Field(1, ge=1, le=1, description="One candidate per request")
    echo: Literal[False] = Field(False, description="Echoing the prompt is not supported")
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("send one prompt (a string, or a list of exactly one)")
        return self


def _params(body: CompletionRequest, features: frozenset[str]) -> GenerationParams:
    asked = {
        "logit_bias": ("logit_bias", bool(body.logit_bias)),
        "presence_penalty": ("penalties", bool(body.presence_penalty)),
        "frequency_penalty": ("penalties", bool(body.frequency_penalty)),
        "logprobs": ("logprobs", body.logprobs is not None),
    }
    extras = body.sampling_extras()
    asked |= {name: (name, True) for name in extras}
    for field, (feature, given) in asked.items():
        if given and feature not in features:
            raise InputError(f"this backend does not support {field}", param=field)
    params = GenerationParams(
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=body.stop_list() or [],
        seed=body.seed,
        logit_bias=body.token_bias(),
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logprobs=body.logprobs is not None,
        top_logprobs=body.logprobs or 0,
    )
    return dataclasses.replace(params, **extras)


def _legacy_logprobs(entries, offset: int = 0) -> dict:
    """OpenAI's legacy ``logprobs`` object: parallel lists per token."""
    tokens = [e.token.decode("utf-8", errors="replace") for e in entries]
    offsets, at = [], offset
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [
            {b.decode("utf-8", errors="replace"): lp for b, lp in e.top} for e in entries
        ],
        "text_offset": offsets,
    }


@router.post("/v1/completions", summary="OpenAI legacy text completions (stream with SSE)")
async def completions(body: CompletionRequest, request: Request, state: Server):
    service = state.admission.require_service()
    backend = service.backend
    if resolve_model(service, body.model) is not None:
        raise InputError(
            f"completions use the served model {backend.model_id!r}; task {body.model!r} "
            "answers on /v1/chat/completions",
            param="model",
        )
    request.state.task = "model"
    params = _params(body, backend.capabilities)
    text = body.prompt if isinstance(body.prompt, str) else body.prompt[0]
    scope = RequestScope(state, request, "the completion", input_param="prompt")
    (handle,) = scope.add([backend.generate(Prompt((), (Segment(text, special=True),)), params)])
    cid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": body.model}
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return event_stream(_stream(scope, handle, head, include_usage), scope.close)
    async with scope:
        (finished,) = await scope.wait_all()
    lp = _legacy_logprobs(finished.logprobs) if finished.logprobs is not None else None
    choice = {"text": finished.result, "index": 0, "logprobs": lp}
    choice["finish_reason"] = finished.reason
    return {**head, "choices": [choice], "usage": UsageInfo.of(finished.usage).model_dump()}


async def _stream(
    scope: RequestScope, handle, head: dict, include_usage: bool
) -> AsyncIterator[str]:
    pending: list = []
    offset = 0
    try:
        async with scope:
            async for event in scope.events(handle):
                if isinstance(event, LogprobsDelta):
                    pending.extend(event.entries)
                elif isinstance(event, TextDelta):
                    lp = _legacy_logprobs(pending, offset) if pending else None
                    pending.clear()
                    offset += len(event.text)
                    choice = {"text": event.text, "index": 0, "logprobs": lp}
                    yield sse({**head, "choices": [{**choice, "finish_reason": None}]})
                elif isinstance(event, Done):
                    reason = event.finished.reason
                    choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": reason}
                    yield sse({**head, "choices": [choice]})
                    if include_usage:
                        usage = UsageInfo.of(event.finished.usage).model_dump()
                        yield sse({**head, "choices": [], "usage": usage})
        yield DONE
    except Exception as exc:  # one error event, then [DONE]
        err = to_api_error(exc)
        yield sse(envelope(err.message, err.type, err.code, err.param))
        yield DONE
    finally:
        scope.close()


class TokenizeRequest(NoEffectFields):
    """POST /tokenize: llama.cpp's ``content`` or vLLM's ``prompt``."""

    model: str | None = None
    content: Text | None = None
    prompt: Text | None = None
    add_special: bool = Field(False, description="Parse control-token markup in the text")
    with_pieces: bool = Field(
        False, description="Also return each token's text (control tokens as their markup)"
    )

    @model_validator(mode="after")
    def _one_text(self) -> TokenizeRequest:
        if (self.content is None) == (self.prompt is None):
            raise ValueError("send the text as content (or prompt), one of them")
        return self


class DetokenizeRequest(NoEffectFields):
    """POST /detokenize: token ids -> text, control tokens as their markup (``<|im_start|>``);
    400 naming ``tokens`` for an id outside the vocabulary."""

    model: str | None = None
    # Strict: true or "5" is not a token id (lax ints would take them as 1 and 5).
    tokens: list[StrictInt] = Field(max_length=1_000_000)


@router.post("/tokenize", summary="Token ids of a text (llama.cpp / vLLM shape)")
async def tokenize(body: TokenizeRequest, state: Server) -> dict:
    backend = state.admission.require_service().backend
    text = body.content if body.content is not None else body.prompt
    assert text is not None
    ids = backend.tokenize(text, special=body.add_special)
    out: dict = {"tokens": ids, "count": len(ids), "max_model_len": backend.context_tokens}
    if body.with_pieces:
        out["pieces"] = [backend.detokenize([t]) for t in ids]
    return out


class _Detokenized(BaseModel):
    content: str
    prompt: str


@router.post("/detokenize", summary="The text of token ids (llama.cpp / vLLM shape)")
async def detokenize(body: DetokenizeRequest, state: Server) -> _Detokenized:
    backend = state.admission.require_service().backend
    text = backend.detokenize(body.tokens)
    return _Detokenized(content=text, prompt=text)
