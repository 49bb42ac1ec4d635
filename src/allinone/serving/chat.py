"""Chat serving: an OpenAI chat request (the common form every chat-like API family converts
to: chat completions, Responses, Anthropic Messages) to engine work and back, as a whole
outcome or as typed events.

``model`` is the served model's id (raw chat) or a task's name: a chat task applies its system
prompt, history budget and reply caps; a classify task answers with one of its labels, an
extract task with its JSON; a decide task is refused (it has its own route).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from allinone.api.chat_request import ChatOptions, chat_messages, chat_options
from allinone.api.protocol import ChatCompletionRequest, ToolCall, UsageInfo
from allinone.api.tool_calls import ToolCallStream, parse_tool_calls
from allinone.backends.base import Finished, TokenLogprob
from allinone.service import TaskService
from allinone.serving.errors import InputError
from allinone.serving.models import resolve_model
from allinone.serving.scope import Done, LogprobsDelta, RequestScope, TextDelta
from allinone.tasks import TaskSpec

if TYPE_CHECKING:
    from allinone.api.state import ServerState

INPUT_PARAM = "messages"


@dataclass
class ChatChoice:
    """One finished choice. ``content`` is None when the reply was only tool calls;
    ``finish_reason``: ``stop``, ``length``, ``tool_calls`` or ``cancelled``; ``stop_sequence``:
    the stop string that ended it, if one did."""

    index: int
    content: str | None
    tool_calls: list[ToolCall]
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None


@dataclass
class ChatOutcome:
    """A finished chat request: its choices and usage (the prompt once, every choice's
    tokens)."""

    choices: list[ChatChoice]
    usage: UsageInfo


@dataclass(frozen=True)
class ChoiceStarted:
    """A choice's first event (OpenAI's stream opens each choice with its role). ``text``: the
    text it starts with, when the whole answer is known at once (a classify task's label, an
    extract task's JSON: OpenAI's stream sends it in the role's chunk); read it as content."""

    index: int
    text: str = ""


@dataclass(frozen=True)
class ContentDelta:
    """Reply text of choice ``index`` with its tokens' log-probabilities (empty unless asked
    for; tokens whose text became tool calls come with an empty ``text``)."""

    index: int
    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass(frozen=True)
class ToolCallEvent:
    """A whole tool call of choice ``index``; ``number`` counts the choice's calls from 0."""

    index: int
    number: int
    call: ToolCall


@dataclass(frozen=True)
class ChoiceFinished:
    """Choice ``index`` ended. ``usage``: this choice's (its prompt and completion tokens)."""

    index: int
    reason: str
    usage: UsageInfo
    stop_sequence: str | None = None


ChatEvent = ChoiceStarted | ContentDelta | ToolCallEvent | ChoiceFinished


def total_usage(usages: list[UsageInfo]) -> UsageInfo:
    """One request's usage over its choices: the prompt once, every choice's tokens."""
    usage = usages[0].model_copy(deep=True)
    usage.completion_tokens = sum(u.completion_tokens for u in usages)
    usage.total_tokens = usage.prompt_tokens + usage.completion_tokens
    return usage


@dataclass
class _Prepared:
    task: TaskSpec | None
    messages: list[dict[str, Any]]
    extra: ChatOptions | None = None
    n: int = 1
    max_calls: int | None = None


class ChatServing:
    """Serves chat requests for one HTTP request (``request``: its Starlette request, for the
    client's hang-up; None from the CLI)."""

    def __init__(self, state: ServerState, request: Any = None) -> None:
        self.state = state
        self.request = request
        self.service: TaskService = state.admission.require_service()

    def scope(self, what: str = "the reply") -> RequestScope:
        """A scope for this request's engine work."""
        return RequestScope(self.state, self.request, what, INPUT_PARAM)

    async def _prepare(self, body: ChatCompletionRequest) -> _Prepared:
        task = resolve_model(self.service, body.model)
        if self.request is not None:
            self.request.state.task = task.name if task else "model"
            self.request.state.input_param = INPUT_PARAM
        messages = chat_messages(body)
        if task is not None and task.kind == "decide":
            raise InputError(
                f"task {task.name!r} is a decide task: send its input to POST /v1/decide",
                param="model",
            )
        if task is not None and task.kind in ("classify", "extract"):
            _refuse_for_label_task(body, task)
            if messages[-1]["role"] != "user":
                raise InputError("the last message must come from the user", param="messages")
            return _Prepared(task, messages)
        schema = task.output.json_schema if task is not None else None
        extra = await chat_options(body, self.service.backend, schema)
        max_calls = None if body.parallel_tool_calls else 1
        return _Prepared(task, messages, extra, body.n, max_calls)

    def _submit(self, body: ChatCompletionRequest, prep: _Prepared, scope: RequestScope) -> list:
        assert prep.extra is not None
        plan = self.service.plan_chat(
            prep.task,
            prep.messages,
            max_tokens=body.max_completion_tokens or body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=(body.stop_list() or []) + prep.extra.stop,
            seed=body.seed,
            tools=prep.extra.tools,
            options=prep.extra.options,
        )
        return scope.add(self.service.submit_chat(plan, prep.n))

    async def _label_answer(self, prep: _Prepared, scope: RequestScope) -> ChatOutcome:
        """A classify or extract task: the last user message is the input; the reply is
        exactly one label, or the extract task's JSON."""
        task = prep.task
        assert task is not None
        text = prep.messages[-1]["content"]
        if task.kind == "classify":
            (result,) = await scope.run(
                self.service.classify_async(task.name, [text]), "classification"
            )
            answer, n_prompt, n_gen = result.label, result.prompt_tokens, 1
        else:
            ext = await scope.run(self.service.extract_async(task.name, text), "extraction")
            answer = json.dumps(ext.output, ensure_ascii=False)
            n_prompt, n_gen = ext.prompt_tokens, ext.completion_tokens
        usage = UsageInfo(
            prompt_tokens=n_prompt, completion_tokens=n_gen, total_tokens=n_prompt + n_gen
        )
        return ChatOutcome([ChatChoice(0, answer, [], "stop")], usage)

    async def create(self, body: ChatCompletionRequest) -> ChatOutcome:
        """Run ``body`` to the end. InputError (400/404 naming the field) for what cannot be
        served; 504/503/499 from the request's bounds (``RequestScope``)."""
        prep = await self._prepare(body)
        async with self.scope() as scope:
            if prep.extra is None:
                return await self._label_answer(prep, scope)
            done = await scope.wait_all(self._submit(body, prep, scope))
        names = prep.extra.tool_names
        choices = []
        for i, finished in enumerate(done):
            content, reason = finished.result, str(finished.reason)
            calls: list[ToolCall] = []
            if names is not None:
                content, calls = parse_tool_calls(finished.result, names, prep.max_calls)
                if calls:
                    reason = "tool_calls"
            choices.append(
                ChatChoice(i, content, calls, reason, finished.logprobs, finished.stop_sequence)
            )
        return ChatOutcome(choices, total_usage([UsageInfo.of(f.usage) for f in done]))

    async def stream(self, body: ChatCompletionRequest) -> EventStream:
        """Check and submit ``body`` now (input errors are raised here, before a byte is
        sent), then return its events: per choice, one after another (each generates
        meanwhile in the engine), ChoiceStarted, ContentDelta / ToolCallEvent, ChoiceFinished.
        A failure mid-stream is raised from the iteration. Call ``aclose()`` when done (in a
        ``finally``): it cancels the engine work, also when the iteration never started."""
        prep = await self._prepare(body)
        scope = self.scope()
        if prep.extra is None:
            return EventStream(self._label_events(prep, scope), scope)
        handles = self._submit(body, prep, scope)
        return EventStream(self._events(prep, scope, handles), scope)

    async def _label_events(self, prep: _Prepared, scope: RequestScope) -> AsyncIterator[ChatEvent]:
        async with scope:
            outcome = await self._label_answer(prep, scope)
        yield ChoiceStarted(0, outcome.choices[0].content or "")
        yield ChoiceFinished(0, "stop", outcome.usage)

    async def _events(
        self, prep: _Prepared, scope: RequestScope, handles: list
    ) -> AsyncIterator[ChatEvent]:
        assert prep.extra is not None
        names = prep.extra.tool_names
        async with scope:
            for index, handle in enumerate(handles):
                yield ChoiceStarted(index)
                calls = ToolCallStream(names, prep.max_calls) if names is not None else None
                n_calls = 0
                pending: list[TokenLogprob] = []
                async for event in scope.events(handle):
                    if isinstance(event, LogprobsDelta):
                        pending.extend(event.entries)
                        continue
                    if isinstance(event, TextDelta):
                        pieces = calls.feed(event.text) if calls else [("content", event.text)]
                    else:
                        pieces = calls.finish() if calls else []
                    for kind, value in pieces:
                        if kind == "content":
                            yield ContentDelta(index, value, _take(pending))
                        else:
                            assert isinstance(value, ToolCall)
                            yield ToolCallEvent(index, n_calls, value)
                            n_calls += 1
                    if isinstance(event, Done):
                        if pending:  # tokens whose text went into tool calls
                            yield ContentDelta(index, "", _take(pending))
                        fin: Finished = event.finished
                        reason = "tool_calls" if n_calls else fin.reason
                        usage = UsageInfo.of(fin.usage)
                        yield ChoiceFinished(index, reason, usage, fin.stop_sequence)

    def count_tokens(self, body: ChatCompletionRequest) -> int:
        """The prompt tokens ``body`` would be served with (rendered and tokenized, no
        inference); for tasks, the chat task's prompt (label tasks: their classify prompt is
        not a chat: InputError)."""
        task = resolve_model(self.service, body.model)
        if task is not None and task.kind != "chat":
            raise InputError(
                f"task {task.name!r} is a {task.kind} task; count tokens with a chat task or "
                "the served model's id",
                param="model",
            )
        # as ``create`` renders it: tools only when they may be called, history bounded for
        # the request's reply length
        calling = bool(body.tools) and body.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in body.tools or []] if calling else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        plan = self.service.plan_chat(task, chat_messages(body), max_tokens, tools=tools)
        backend = self.service.backend
        segments = (*plan.prompt.prefix, *plan.prompt.body)
        return sum(len(backend.tokenize(s.text, special=s.special)) for s in segments)


class EventStream:
    """A chat's events (``async for``); ``aclose`` cancels its engine work."""

    def __init__(self, events: AsyncIterator[ChatEvent], scope: RequestScope) -> None:
        self._events = events
        self._scope = scope

    def __aiter__(self) -> EventStream:
        return self

    async def __anext__(self) -> ChatEvent:
        return await anext(self._events)

    async def aclose(self) -> None:
        """Stop: cancel the engine work and close the iteration."""
        self._scope.close()
        await self._events.aclose()  # type: ignore[attr-defined]


def _take(entries: list[TokenLogprob]) -> list[TokenLogprob]:
    """The pending entries, emptying the list."""
    out = list(entries)
    entries.clear()
    return out


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
            raise InputError(
                f"task {task.name!r} is a {task.kind} task, which answers with its own "
                f"{'label' if task.kind == 'classify' else 'JSON'}; {name} does not apply "
                f"(send it with model {task.name!r} replaced by the served model's id)",
                param=name,
            )
