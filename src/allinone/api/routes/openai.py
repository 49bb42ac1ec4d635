"""OpenAI-compatible routes: /v1/models and /v1/chat/completions (plain and streamed).

``model`` may be the served model's id (raw chat) or any task's name: a chat task applies its
system prompt, history budget and reply caps; a classify task answers with one of its labels.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from allinone.api.chat_request import chat_messages, chat_options
from allinone.api.protocol import (
    DONE,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    Choice,
    ChoiceLogprobs,
    ChunkStream,
    ModelCard,
    ModelList,
    ModelMetadata,
    UsageInfo,
)
from allinone.api.routes.decisions import MODEL_ALIASES
from allinone.api.tool_calls import ToolCallStream, parse_tool_calls
from allinone.backends.base import ParamError, PromptTooLongError
from allinone.errors import (
    InvalidRequestError,
    NotFoundError,
    envelope,
    to_api_error,
)
from allinone.service import TaskService
from allinone.tasks import TaskError, TaskSpec

log = logging.getLogger(__name__)
router = APIRouter(tags=["openai"])


@router.get("/v1/models", response_model=ModelList, summary="The loaded model and every task")
async def list_models(request: Request) -> ModelList:
    state = request.app.state.server
    service = state.require_service()
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


def _resolve_task(service: TaskService, model: str) -> TaskSpec | None:
    if model == service.backend.model_id:
        return None
    if model in service.tasks:
        return service.tasks.get(model)
    known = [service.backend.model_id, *(t.name for t in service.tasks)]
    raise NotFoundError(
        f"model {model!r} not found; use one of: {', '.join(known)}",
        param="model",
        code="model_not_found",
    )


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


@router.post("/v1/chat/completions", summary="OpenAI chat completions (stream with SSE)")
async def chat_completions(body: ChatCompletionRequest, request: Request):
    state = request.app.state.server
    service: TaskService = state.require_service()
    task = _resolve_task(service, body.model)
    request.state.task = task.name if task else "model"
    messages = chat_messages(body)
    if task is not None and task.kind == "decide":
        raise InvalidRequestError(
            f"task {task.name!r} is a decide task: send its input to POST /v1/decide",
            param="model",
        )
    if task is not None and task.kind in ("classify", "extract"):
        _refuse_for_label_task(body, task)
        return await _answer_as_chat(state, request, service, task, messages, body)
    schema = task.output.json_schema if task is not None else None
    extra = await chat_options(body, service.backend, schema)
    try:
        plan = service.plan_chat(
            task,
            messages,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=(body.stop_list() or []) + extra.stop,
            seed=body.seed,
            tools=extra.tools,
            options=extra.options,
        )
        handles = service.submit_chat(plan, body.n)
    except (TaskError, PromptTooLongError) as exc:
        raise to_api_error(exc, param="messages") from exc
    except ParamError as exc:
        raise to_api_error(exc) from exc
    max_calls = None if body.parallel_tool_calls else 1
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(
            _stream(handles, body.model, include_usage, state, extra.tool_names, max_calls),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    try:
        done = await state.bounded(
            asyncio.gather(*(h.result_async() for h in handles)), "the reply", request=request
        )
    finally:
        for h in handles:  # timeout, drain deadline or client gone: free the sequences
            h.cancel()
    choices = []
    for i, finished in enumerate(done):
        content, calls = finished.result, None
        reason = finished.reason
        if extra.tool_names is not None:
            content, found = parse_tool_calls(finished.result, extra.tool_names, max_calls)
            if found:
                calls, reason = found, "tool_calls"
        lp = ChoiceLogprobs.of(finished.logprobs) if finished.logprobs is not None else None
        message = ChatCompletionMessage(content=content, tool_calls=calls)
        choices.append(Choice(index=i, message=message, finish_reason=reason, logprobs=lp))
    return ChatCompletionResponse(model=body.model, choices=choices, usage=_usage(done))


def _usage(done: list) -> UsageInfo:
    """One request's usage over all its choices: the prompt once, every choice's tokens."""
    usage = UsageInfo.of(done[0].usage)
    usage.completion_tokens = sum(f.usage.completion_tokens for f in done)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


def _refuse_for_label_task(body: ChatCompletionRequest, task: TaskSpec) -> None:
    """A classify or extract task answers with its own label or JSON: fields that would shape
    a free reply cannot apply (400 naming the first one sent)."""
    sent = {
        "response_format": body.response_format is not None,
        "tools": bool(body.tools),
        "logprobs": body.logprobs,
        "logit_bias": bool(body.logit_bias),
        "presence_penalty": bool(body.presence_penalty),
        "frequency_penalty": bool(body.frequency_penalty),
        **dict.fromkeys(body.sampling_extras(), True),
    }
    for name, given in sent.items():
        if given:
            raise InvalidRequestError(
                f"task {task.name!r} is a {task.kind} task, which answers with its own "
                f"{'label' if task.kind == 'classify' else 'JSON'}; {name} does not apply "
                f"(send it with model {task.name!r} replaced by the served model's id)",
                param=name,
            )


async def _stream(
    handles: list,
    model: str,
    include_usage: bool,
    state,
    tool_names: set[str] | None = None,
    max_calls: int | None = None,
) -> AsyncIterator[str]:
    """SSE chunks of every choice, one choice after another (each generates meanwhile in the
    engine, so a later choice's chunks are ready when its turn comes)."""
    out = ChunkStream(model)
    done: list = []
    try:
        yield out.delta("", role=True)
        for index, handle in enumerate(handles):
            chunks = _choice_chunks(out, handle, index, state, tool_names, done, max_calls)
            async for chunk in chunks:
                yield chunk
        if include_usage:
            yield out.usage(_usage(done))
        yield DONE
    except Exception as exc:  # a failure mid-stream ends it with one error event, then [DONE]
        err = to_api_error(exc)
        yield _sse(envelope(err.message, err.type, err.code, err.param))
        yield DONE
    finally:
        for handle in handles:
            handle.cancel()


async def _choice_chunks(
    out: ChunkStream,
    handle,
    index: int,
    state,
    tool_names: set[str] | None,
    done: list,
    max_calls: int | None = None,
) -> AsyncIterator[str]:
    """One choice's chunks: content (with its tokens' logprobs), tool calls (each with its own
    ``index`` and id), its finish."""
    calls = ToolCallStream(tool_names, max_calls) if tool_names is not None else None
    n_calls = 0
    pending_lp: list = []

    def emit(events) -> list[str]:
        nonlocal n_calls
        chunks = []
        for kind, value in events:
            if kind == "content":
                chunks.append(out.delta(value, logprobs=_take(pending_lp), index=index))
            else:
                chunks.append(out.tool_call(n_calls, value, choice=index))
                n_calls += 1
        return chunks

    if index > 0:
        yield out.delta("", role=True, index=index)
    async for kind, value in state.bounded_iter(handle.aevents(), "the reply"):
        if kind == "logprobs":
            pending_lp.extend(value)
            continue
        if kind == "text":
            for chunk in emit(calls.feed(value) if calls is not None else [("content", value)]):
                yield chunk
            continue
        if calls is not None:
            for chunk in emit(calls.finish()):
                yield chunk
        if pending_lp:  # tokens whose text went into tool calls
            yield out.delta("", logprobs=_take(pending_lp), index=index)
        yield out.finish("tool_calls" if n_calls else value.reason, index=index)
        done.append(value)


def _take(entries: list) -> ChoiceLogprobs | None:
    """The pending token log-probabilities as a chunk's ``logprobs`` (None when there are none),
    emptying the list."""
    if not entries:
        return None
    lp = ChoiceLogprobs.of(entries)
    entries.clear()
    return lp


async def _answer_as_chat(
    state,
    request: Request,
    service: TaskService,
    task: TaskSpec,
    messages: list[dict[str, str]],
    body: ChatCompletionRequest,
):
    """A classify or extract task through the chat API: the last user message is the input;
    the reply is exactly one label, or the extract task's JSON."""
    if messages[-1]["role"] != "user":
        raise InvalidRequestError("the last message must come from the user", param="messages")
    text = messages[-1]["content"]
    try:
        if task.kind == "classify":
            (result,) = await state.bounded(
                service.classify_async(task.name, [text]), "classification", request=request
            )
            answer, n_prompt, n_gen = result.label, result.prompt_tokens, 1
        else:
            ext = await state.bounded(
                service.extract_async(task.name, text), "extraction", request=request
            )
            answer = json.dumps(ext.output, ensure_ascii=False)
            n_prompt, n_gen = ext.prompt_tokens, ext.completion_tokens
    except (TaskError, PromptTooLongError) as exc:
        raise to_api_error(exc, param="messages") from exc
    usage = UsageInfo(
        prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen
    )
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def one() -> AsyncIterator[str]:
            out = ChunkStream(body.model)
            yield out.delta(answer, role=True)
            yield out.finish("stop")
            if include_usage:
                yield out.usage(usage)
            yield DONE

        return StreamingResponse(one(), media_type="text/event-stream")
    return ChatCompletionResponse(
        model=body.model,
        choices=[Choice(message=ChatCompletionMessage(content=answer), finish_reason="stop")],
        usage=usage,
    )
