"""Responses serving: OpenAI's Responses API (``POST /v1/responses``) over chat serving.

One converter, :func:`to_chat`, turns a Responses request into the chat request every chat-like
API family runs (``ChatServing``): ``instructions`` becomes a leading system message, input
items become messages (function calls merged into the assistant message before them, function
outputs ``tool`` messages), ``text.format`` becomes ``response_format``, flat function tools
chat's nested ones. One formatter, :class:`ResponseBuilder`, turns chat's result back into a
response object, and its events into the Responses stream's events, so a streamed response ends
with the same object a plain one returns.

Nothing is stored: fields that need stored state or hosted features (``previous_response_id``,
``store: true``, ``reasoning`` ...) are refused by name (``REFUSED``), never dropped. Every
input error names the Responses field (``input.2.call_id``), also when chat serving finds it
(``messages.3`` -> the input item that message came from).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import ValidationError

from allinone.api.protocol import ChatCompletionRequest, LogprobEntry, ToolCall, UsageInfo
from allinone.api.responses_protocol import (
    LOGPROBS,
    FunctionCallItem,
    FunctionCallOutputItem,
    FunctionTool,
    FunctionToolCall,
    FunctionToolChoice,
    IncompleteDetails,
    InputMessage,
    InputTextPart,
    InputTokensDetails,
    OutputMessage,
    OutputText,
    OutputTextPart,
    RefusalPart,
    ResponseError,
    ResponsesRequest,
    ResponsesResponse,
    ResponseUsage,
)
from allinone.errors import APIError, to_api_error
from allinone.serving.chat import ChatServing, ChoiceFinished, ContentDelta, ToolCallEvent
from allinone.serving.errors import InputError
from allinone.serving.models import resolve_model
from allinone.serving.sse import sse

if TYPE_CHECKING:
    from allinone.api.state import ServerState
    from allinone.backends.base import TokenLogprob

INPUT_PARAM = "input"

_STATELESS = "this server keeps no responses or conversations (it is stateless)"
REFUSED: dict[str, str] = {
    "previous_response_id": f"{_STATELESS}: send the whole conversation in input, the earlier "
    "response's output items included",
    "conversation": f"{_STATELESS}: send the whole conversation in input",
    "store": f"{_STATELESS}, so a response cannot be stored: send store: false or leave it out",
    "background": f"{_STATELESS}, so a response cannot run in the background to be fetched "
    "later: leave background out (stream the response to see it as it is made)",
    "prompt": "this server has no stored prompt templates: send the prompt as instructions "
    "and input",
    "context_management": f"{_STATELESS}, so it cannot compact a stored context: send the "
    "conversation in input",
    "reasoning": "the served model does not reason (it has no reasoning mode to turn on or "
    "off); remove reasoning",
    "moderation": "this server has no moderation model: remove moderation",
    "prompt_cache_options": "this server caches prompt prefixes itself and takes no options "
    "for it: remove prompt_cache_options",
    "image": "this server has no image model: remove image",
    "access_programs": "this server has no access programs: remove access_programs",
}
"""Fields refused when set (``store`` and ``background`` when true), with why."""


def _refuse_unservable(body: ResponsesRequest) -> None:
    for name, why in REFUSED.items():
        value = getattr(body, name)
        if value is None or (name in ("store", "background") and value is False):
            continue
        raise InputError(f"{name} is not supported: {why}", param=name)
    text = body.text
    if text is not None and text.verbosity not in (None, "medium"):
        raise InputError(
            f"verbosity {text.verbosity!r} is not supported: the served model has one verbosity "
            "(medium); cap the reply with max_output_tokens",
            param="text.verbosity",
        )


def _chat_param(origins: list[str], chat_param: str | None) -> str:
    """The Responses field of a chat request's field (``messages.3.content`` -> the input item
    that message came from, ``response_format`` -> ``text.format``); ``input`` for none."""
    if chat_param is None:
        return INPUT_PARAM
    head, _, rest = chat_param.partition(".")
    if head == "messages":
        index = rest.partition(".")[0]
        if index.isdigit() and int(index) < len(origins):
            return origins[int(index)]
        return INPUT_PARAM
    if head in ("max_tokens", "max_completion_tokens"):
        return "max_output_tokens"
    if head == "response_format":
        return "text.format"
    if head in ("logprobs", "top_logprobs"):
        return "include"
    if head == "tools" and ".function." in chat_param:
        return chat_param.replace(".function.", ".", 1)
    if head == "tool_choice":
        return "tool_choice"
    return chat_param


@dataclass
class Converted:
    """A Responses request as a chat request, with what the response echoes and where each
    chat message came from (``origins[i]``: the Responses field of ``messages[i]``)."""

    chat: ChatCompletionRequest
    origins: list[str]
    tools: list[dict[str, Any]]
    tool_choice: str | dict[str, Any]
    text: dict[str, Any]
    logprobs: bool

    def rename(self, exc: BaseException) -> None:
        """Rewrite an input error's field from chat's names to the Responses ones, in place
        (other errors are left as they are)."""
        if not isinstance(exc, InputError | APIError):
            return
        if isinstance(exc, APIError) and exc.status not in (400, 404):
            return
        if exc.param != "model":
            exc.param = _chat_param(self.origins, exc.param)


def to_chat(body: ResponsesRequest) -> Converted:
    """The chat request that serves ``body``. InputError names the Responses field for what
    cannot be served."""
    _refuse_unservable(body)
    messages: list[dict[str, Any]] = []
    origins: list[str] = []
    if body.instructions is not None:
        messages.append({"role": "system", "content": body.instructions})
        origins.append("instructions")
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        origins.append(INPUT_PARAM)
    elif not body.input:
        raise InputError("input is empty: send text, or a list of items", param=INPUT_PARAM)
    else:
        _items_to_messages(body.input, messages, origins)
    fields: dict[str, Any] = {"model": body.model, "messages": messages, "n": 1}
    fields["stream"] = bool(body.stream)
    for name, value in (
        ("max_tokens", body.max_output_tokens),
        ("temperature", body.temperature),
        ("top_p", body.top_p),
        ("parallel_tool_calls", body.parallel_tool_calls),
    ):
        if value is not None:
            fields[name] = value
    tools, tool_choice = _tools(body, fields)
    text = _text_format(body, fields)
    # Log-probabilities come when asked for by ``include`` (OpenAI's rule), or by a
    # ``top_logprobs`` above 0, which asks for nothing else.
    logprobs = LOGPROBS in (body.include or []) or bool(body.top_logprobs)
    if logprobs:
        fields["logprobs"] = True
        fields["top_logprobs"] = body.top_logprobs or 0
    try:
        chat = ChatCompletionRequest.model_validate(fields)
    except ValidationError as exc:  # a chat rule the Responses models do not repeat
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or None
        message = error["msg"].removeprefix("Value error, ")
        raise InputError(message, param=_chat_param(origins, where)) from None
    return Converted(chat, origins, tools, tool_choice, text, logprobs)


def _items_to_messages(items: list, messages: list[dict[str, Any]], origins: list[str]) -> None:
    called: set[str] = set()
    for i, item in enumerate(items):
        where = f"{INPUT_PARAM}.{i}"
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": _message_text(item, where)})
            origins.append(where)
        elif isinstance(item, FunctionCallItem):
            try:
                args = json.loads(item.arguments)
            except (ValueError, RecursionError):
                args = None
            if not isinstance(args, dict):
                raise InputError(
                    "arguments must be a JSON object written as a string",
                    param=f"{where}.arguments",
                )
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # the calls of one turn: after its text, or beside the turn's other calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
                origins.append(where)
            called.add(item.call_id)
        elif isinstance(item, FunctionCallOutputItem):
            if item.call_id not in called:
                raise InputError(
                    f"no function_call item with call_id {item.call_id!r} comes before this "
                    "output: send the call (the earlier response's function_call item) first",
                    param=f"{where}.call_id",
                )
            text = _parts_text(item.output, f"{where}.output", ("input_text",))
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": text})
            origins.append(where)
        else:
            raise InputError(
                f"input items of type {item.type!r} are not supported: this server takes "
                "message, function_call and function_call_output items"
                + (" (the served model does not reason)" if item.type == "reasoning" else ""),
                param=f"{where}.type",
            )


def _message_text(item: InputMessage, where: str) -> str:
    # Any text part in any role: the SDK's easy message takes input_text parts for every role,
    # and an earlier response's message comes back with output_text (or refusal) parts.
    return _parts_text(item.content, f"{where}.content", _TEXT_PARTS)


def _parts_text(content: str | list, where: str, kinds: tuple[str, ...]) -> str:
    """The text of content parts of the given types, joined; InputError naming the first part
    of another type."""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        if part.type not in kinds:
            why = "" if part.type in _TEXT_PARTS else " (the served model reads text only)"
            raise InputError(
                f"content parts of type {part.type!r} are not supported here{why}: send "
                f"{' or '.join(kinds)} parts",
                param=f"{where}.{j}.type",
            )
        if isinstance(part, (InputTextPart, OutputTextPart)):
            texts.append(part.text)
        elif isinstance(part, RefusalPart):
            texts.append(part.refusal)
    return "".join(texts)


_TEXT_PARTS = ("input_text", "output_text", "refusal")


def _tools(
    body: ResponsesRequest, fields: dict[str, Any]
) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
    """Function tools and ``tool_choice`` into chat's ``fields``; returns them as the response
    echoes them."""
    chat_tools, echo = [], []
    for i, entry in enumerate(body.tools or []):
        kind = entry.get("type")
        if kind != "function":
            raise InputError(
                f"tools of type {kind!r} are not supported: this server has no hosted tools; "
                "send function tools (your code runs them and sends back function_call_output)",
                param=f"tools.{i}.type",
            )
        try:
            tool = FunctionTool.model_validate(entry)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in (f"tools.{i}", *error["loc"]))
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "function tools do not take this field; remove it"
            raise InputError(message, param=where) from None
        function = tool.model_dump(exclude={"type"}, exclude_none=True)
        chat_tools.append({"type": "function", "function": function})
        echo.append(tool.model_dump())
    if chat_tools:
        fields["tools"] = chat_tools
    choice = body.tool_choice
    if choice is None:
        return echo, "auto"
    echo_choice: str | dict[str, Any]
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InputError(
                f"tool_choice {choice!r} is not one of 'none', 'auto', 'required', or "
                "{'type': 'function', 'name': ...}",
                param="tool_choice",
            )
        echo_choice = fields["tool_choice"] = choice
    else:
        if choice.get("type") != "function":
            raise InputError(
                f"tool_choice of type {choice.get('type')!r} is not supported: send 'none', "
                "'auto', 'required', or {'type': 'function', 'name': ...}",
                param="tool_choice.type",
            )
        try:
            named = FunctionToolChoice.model_validate(choice)
        except ValidationError as exc:
            error = exc.errors()[0]
            where = ".".join(str(p) for p in ("tool_choice", *error["loc"]))
            raise InputError(error["msg"].removeprefix("Value error, "), param=where) from None
        echo_choice = named.model_dump()
        fields["tool_choice"] = {"type": "function", "function": {"name": named.name}}
    if echo_choice != "none" and not chat_tools:
        raise InputError(
            "tool_choice needs tools: send the functions the model may call",
            param="tool_choice",
        )
    return echo, echo_choice


def _text_format(body: ResponsesRequest, fields: dict[str, Any]) -> dict[str, Any]:
    """``text.format`` into chat's ``response_format``; returns ``text`` as the response
    echoes it."""
    fmt = body.text.format if body.text is not None else None
    echo: dict[str, Any] = {"format": {"type": "text"}, "verbosity": "medium"}
    if fmt is None:
        return echo
    echo["format"] = fmt.model_dump(by_alias=True, exclude_none=True)
    if fmt.type == "json_object":
        fields["response_format"] = {"type": "json_object"}
    elif fmt.type == "json_schema":
        schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
        if fmt.description is not None:
            schema["description"] = fmt.description
        if fmt.strict is not None:
            schema["strict"] = fmt.strict
        fields["response_format"] = {"type": "json_schema", "json_schema": schema}
    # "text" is the default: nothing to send (a label task refuses any response_format)
    return echo


# -- back: chat results and events to a response and its stream events ----------------------


class ResponseBuilder:
    """One response, built from chat's results in the order they come (text, tool calls, the
    finish), with the stream events that report each step. A plain response is built with the
    same calls, its events unused, so it equals a streamed one's final object."""

    def __init__(self, body: ResponsesRequest, converted: Converted) -> None:
        self.response = ResponsesResponse(
            model=body.model,
            instructions=body.instructions,
            max_output_tokens=body.max_output_tokens,
            max_tool_calls=body.max_tool_calls,
            parallel_tool_calls=body.parallel_tool_calls is not False,
            temperature=body.temperature,
            top_p=body.top_p,
            top_logprobs=body.top_logprobs,
            text=converted.text,
            tool_choice=converted.tool_choice,
            tools=converted.tools,
            truncation=body.truncation or "disabled",
            user=body.user,
            safety_identifier=body.safety_identifier,
            prompt_cache_key=body.prompt_cache_key,
            metadata=body.metadata or {},
        )
        self.logprobs = converted.logprobs
        self.sequence_number = 0
        self._message: OutputMessage | None = None
        self._held = ""  # leading whitespace, held until text follows (or dropped for calls)
        self._held_logprobs: list[LogprobEntry] = []
        self._unsent: list[LogprobEntry] = []  # in the message, not yet in a delta event

    def event(self, type_: str, **fields: Any) -> dict[str, Any]:
        """One stream event's JSON: its type, the next sequence number, its fields."""
        data = {"type": type_, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return data

    def _snapshot(self) -> dict[str, Any]:
        return self.response.model_dump(mode="json")

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        return [
            self.event("response.created", response=self._snapshot()),
            self.event("response.in_progress", response=self._snapshot()),
        ]

    def text(self, delta: str, logprobs: list[TokenLogprob] | None = None) -> list[dict]:
        """Reply text: opens the message item at its first non-blank text."""
        entries = [LogprobEntry.of(e) for e in logprobs or []] if self.logprobs else []
        if self._message is not None:
            return self._append(delta, entries)
        self._held += delta
        self._held_logprobs += entries
        if not self._held.strip():
            return []
        return self._open_message() + self._append(*self._take_held())

    def _take_held(self) -> tuple[str, list[LogprobEntry]]:
        held = self._held, self._held_logprobs
        self._held, self._held_logprobs = "", []
        return held

    def _append(self, delta: str, entries: list[LogprobEntry]) -> list[dict[str, Any]]:
        assert self._message is not None
        part = self._message.content[0]
        part.text += delta
        part.logprobs += entries
        self._unsent += entries
        if not delta:  # (log-probabilities of tokens without text go with the next delta)
            return []
        wire = [e.model_dump(mode="json") for e in self._unsent]
        self._unsent = []
        return [self.event("response.output_text.delta", **self._at(), delta=delta, logprobs=wire)]

    def _at(self, content: bool = True) -> dict[str, Any]:
        assert self._message is not None
        where: dict[str, Any] = {
            "item_id": self._message.id,
            "output_index": len(self.response.output) - 1,
        }
        if content:
            where["content_index"] = 0
        return where

    def _open_message(self) -> list[dict[str, Any]]:
        self._message = OutputMessage()
        self.response.output.append(self._message)
        added = self.event(
            "response.output_item.added",
            output_index=len(self.response.output) - 1,
            item=self._message.model_dump(mode="json"),
        )
        self._message.content.append(OutputText(text=""))
        part = self.event(
            "response.content_part.added", **self._at(), part=OutputText(text="").model_dump()
        )
        return [added, part]

    def _close_message(
        self, status: Literal["completed", "incomplete"] = "completed"
    ) -> list[dict[str, Any]]:
        message = self._message
        if message is None:
            return []
        part = message.content[0]
        logprobs = [e.model_dump(mode="json") for e in part.logprobs]
        events = [
            self.event(
                "response.output_text.done", **self._at(), text=part.text, logprobs=logprobs
            ),
            self.event("response.content_part.done", **self._at(), part=part.model_dump()),
        ]
        message.status = status
        events.append(
            self.event(
                "response.output_item.done",
                output_index=self._at()["output_index"],
                item=message.model_dump(mode="json"),
            )
        )
        self._message = None
        return events

    def tool_call(self, call: ToolCall) -> list[dict[str, Any]]:
        """A whole function call: closes the message before it, then its own item."""
        events = self._close_message()
        self._held, self._held_logprobs = "", []  # blank text before a call is no message
        item = FunctionToolCall(
            call_id=call.id, name=call.function.name, arguments=call.function.arguments
        )
        self.response.output.append(item)
        index = len(self.response.output) - 1
        added = item.model_copy(update={"arguments": ""}).model_dump(mode="json")
        events.append(self.event("response.output_item.added", output_index=index, item=added))
        where = {"item_id": item.id, "output_index": index}
        args = item.arguments
        events.append(self.event("response.function_call_arguments.delta", **where, delta=args))
        events.append(self.event("response.function_call_arguments.done", **where, arguments=args))
        item.status = "completed"
        events.append(
            self.event("response.output_item.done", output_index=index, item=item.model_dump())
        )
        return events

    def finish(self, reason: str, usage: UsageInfo) -> list[dict[str, Any]]:
        """The end: a length stop is ``incomplete`` (``max_output_tokens``), a cancelled
        reply ``failed``; otherwise ``completed``. A reply with no items gets an empty
        message."""
        events: list[dict[str, Any]] = []
        if not self.response.output:  # (a blank or empty reply is still a message)
            events += self._open_message()
            events += self._append(*self._take_held())
        events += self._close_message("incomplete" if reason == "length" else "completed")
        response = self.response
        response.usage = _usage(usage)
        if reason == "length":
            response.status = "incomplete"
            response.incomplete_details = IncompleteDetails(reason="max_output_tokens")
            kind = "response.incomplete"
        elif reason == "cancelled":
            response.status = "failed"
            response.error = ResponseError(
                code="server_error", message="the reply was cancelled before it finished"
            )
            kind = "response.failed"
        else:
            response.status = "completed"
            response.completed_at = int(time.time())
            kind = "response.completed"
        events.append(self.event(kind, response=self._snapshot()))
        return events

    def fail(self, err: APIError) -> list[dict[str, Any]]:
        """A failure mid-stream: an ``error`` event, then ``response.failed`` (the items so far,
        an open message ``incomplete``)."""
        if self._message is not None:
            self._message.status = "incomplete"
        response = self.response
        response.status = "failed"
        code = "invalid_prompt" if 400 <= err.status < 500 else "server_error"
        response.error = ResponseError(code=code, message=err.message)
        return [
            self.event("error", code=err.code, message=err.message, param=err.param),
            self.event("response.failed", response=self._snapshot()),
        ]


def _usage(usage: UsageInfo) -> ResponseUsage:
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return ResponseUsage(
        input_tokens=usage.prompt_tokens,
        input_tokens_details=InputTokensDetails(cached_tokens=cached),
        output_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
    )


def encode(event: dict[str, Any]) -> str:
    """One Responses stream event as SSE (``event:`` line = its type)."""
    return sse(event, event=event["type"])


class ResponsesServing:
    """Serves Responses requests for one HTTP request (``request``: its Starlette request;
    None from the CLI)."""

    def __init__(self, state: ServerState, request: Any = None) -> None:
        self.chat = ChatServing(state, request)
        self.request = request

    def _convert(self, body: ResponsesRequest) -> Converted:
        converted = to_chat(body)
        task = resolve_model(self.chat.service, body.model)
        if task is not None and task.kind in ("classify", "extract") and body.instructions:
            # such a task reads the last user message only, with its own prompt
            raise InputError(
                f"task {task.name!r} is a {task.kind} task, which answers the last user "
                "message with its own prompt; instructions do not apply (send them with model "
                f"{task.name!r} replaced by the served model's id)",
                param="instructions",
            )
        return converted

    async def create(self, body: ResponsesRequest) -> ResponsesResponse:
        """The whole response. InputError (400/404 naming the Responses field) for what cannot
        be served; the chat request's bounds otherwise (504/503/499)."""
        converted = self._convert(body)
        try:
            outcome = await self.chat.create(converted.chat)
        except Exception as exc:
            converted.rename(exc)
            raise
        choice = outcome.choices[0]
        builder = ResponseBuilder(body, converted)
        builder.text(choice.content or "", choice.logprobs)
        for call in choice.tool_calls:
            builder.tool_call(call)
        builder.finish(choice.finish_reason, outcome.usage)
        return builder.response

    async def stream(self, body: ResponsesRequest) -> AsyncIterator[str]:
        """Check and submit ``body`` now (input errors are raised here, before a byte is
        sent), then return its SSE events in the Responses order: ``response.created``,
        ``response.in_progress``, the items' events, ``response.completed`` (or
        ``.incomplete``); a failure mid-stream ends it with ``error`` and ``response.failed``."""
        converted = self._convert(body)
        try:
            events = await self.chat.stream(converted.chat)
        except Exception as exc:
            converted.rename(exc)
            raise
        builder = ResponseBuilder(body, converted)

        async def frames() -> AsyncIterator[str]:
            try:
                for out in builder.start():
                    yield encode(out)
                async for ev in events:
                    if isinstance(ev, ContentDelta):
                        made = builder.text(ev.text, ev.logprobs)
                    elif isinstance(ev, ToolCallEvent):
                        made = builder.tool_call(ev.call)
                    elif isinstance(ev, ChoiceFinished):
                        made = builder.finish(ev.reason, ev.usage)
                    elif ev.text:  # ChoiceStarted with a whole answer (a label task)
                        made = builder.text(ev.text, [])
                    else:  # ChoiceStarted: the response was opened already
                        continue
                    for out in made:
                        yield encode(out)
            except Exception as exc:
                converted.rename(exc)
                for out in builder.fail(to_api_error(exc, param=INPUT_PARAM)):
                    yield encode(out)
            finally:
                await events.aclose()

        return frames()
