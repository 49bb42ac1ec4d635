"""Legacy text completions (OpenAI's ``POST /v1/completions``, plain and streamed).

A completion's prompt is raw text for the model, with control-token markup parsed (as
llama.cpp's server and vLLM do): evaluation tools send templated prompts themselves. One
prompt, one choice; only the served model's id as ``model``."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from allinone.api.completions_protocol import CompletionRequest
from allinone.api.protocol import UsageInfo
from allinone.backends.base import GenerationParams, Prompt, Segment
from allinone.errors import envelope, to_api_error
from allinone.serving.errors import InputError
from allinone.serving.models import resolve_model
from allinone.serving.scope import Done, LogprobsDelta, RequestScope, TextDelta
from allinone.serving.sse import DONE, event_stream, sse

if TYPE_CHECKING:
    from allinone.api.state import ServerState


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


async def completion(state: ServerState, request: Any, body: CompletionRequest) -> Any:
    """The completion as OpenAI's ``text_completion`` object, or its event stream."""
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
