"""OpenAI-compatible routes: /v1/models and /v1/chat/completions (plain and streamed); the
serving is ``allinone.serving.chat``."""

from __future__ import annotations

import datetime
import time
from collections.abc import AsyncIterator

from fastapi import Request

from allinone.api.dialects import dialect_router
from allinone.api.protocol import (
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkStream,
    ModelCard,
    ModelList,
    ModelMetadata,
)
from allinone.api.state import Server
from allinone.errors import envelope, to_api_error
from allinone.serving.chat import (
    ChatServing,
    ChoiceFinished,
    ChoiceStarted,
    ContentDelta,
    EventStream,
    total_usage,
)
from allinone.serving.decisions import MODEL_ALIASES
from allinone.serving.sse import DONE, event_stream, sse

router = dialect_router(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, summary="The loaded model and every task")
async def list_models(state: Server) -> ModelList:
    service = state.admission.require_service()
    cards = [ModelCard(id=service.backend.model_id, kind="model", description="the loaded model")]
    cards += [
        ModelCard(
            id=t.name, kind=f"task:{t.kind}", description=t.description, labels=t.labels or None
        )
        for t in state.tasks
    ]
    # TypeSafe's list: the names /v1/systemone accepts (the served id and the "jev" aliases,
    # all answered by the one model); the date is the model file's.
    path = getattr(service.backend, "model_path", None)
    when = datetime.date.fromtimestamp(path.stat().st_mtime if path else time.time())
    meta = [
        ModelMetadata(
            name=name,
            description=f"decisions answered by {service.backend.model_id}",
            release_date=when.isoformat(),
        )
        for name in (service.backend.model_id, *MODEL_ALIASES)
    ]
    return ModelList(data=cards, models=meta)


@router.post("/v1/chat/completions", summary="OpenAI chat completions (stream with SSE)")
async def chat_completions(body: ChatCompletionRequest, request: Request, state: Server):
    chat = ChatServing(state, request)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = await chat.stream(body)
        return event_stream(_chunks(events, body.model, include_usage), events.aclose)
    outcome = await chat.create(body)
    choices = [
        Choice(
            index=c.index,
            message=ChatCompletionMessage(content=c.content, tool_calls=c.tool_calls or None),
            finish_reason=c.finish_reason,
            logprobs=ChoiceLogprobs.of(c.logprobs) if c.logprobs is not None else None,
        )
        for c in outcome.choices
    ]
    return ChatCompletionResponse(model=body.model, choices=choices, usage=outcome.usage)


async def _chunks(events: EventStream, model: str, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's chunks for the chat events; a failure mid-stream ends it with one error event,
    then ``[DONE]``."""
    out = ChunkStream(model)
    usages = []
    try:
        async for ev in events:
            if isinstance(ev, ChoiceStarted):
                yield out.delta(ev.text, role=True, index=ev.index)
            elif isinstance(ev, ContentDelta):
                lp = ChoiceLogprobs.of(ev.logprobs) if ev.logprobs else None
                yield out.delta(ev.text, logprobs=lp, index=ev.index)
            elif isinstance(ev, ChoiceFinished):
                usages.append(ev.usage)
                yield out.finish(ev.reason, index=ev.index)
            else:
                yield out.tool_call(ev.number, ev.call, choice=ev.index)
        if include_usage:
            yield out.usage(total_usage(usages))
        yield DONE
    except Exception as exc:
        err = to_api_error(exc)
        yield sse(envelope(err.message, err.type, err.code, err.param))
        yield DONE
    finally:
        await events.aclose()
