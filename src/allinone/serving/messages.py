"""Anthropic's Messages API over the chat core: a Messages request becomes a chat request
(:func:`to_chat`), the chat outcome or events become a ``Message`` or its event stream, and
failures are answered in Anthropic's error shape (:class:`AnthropicDialect`).

What a Messages request may ask for, and what becomes of it (docs/api/messages.md):
``system`` and ``system`` turns are system messages (text blocks joined by a blank line);
``text`` blocks are text; an assistant's ``tool_use`` blocks are its tool calls and a user's
``tool_result`` blocks the tool messages that answer them (``is_error`` as an ``Error:``
prefix); an assistant's earlier ``thinking`` blocks are dropped (Anthropic's API, too, leaves
earlier turns' thinking out of the prompt); images, documents, server tools and hosted
features are refused by name, as is any field this server cannot honour.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NoReturn

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from allinone.api.dialects import ErrorDialect
from allinone.api.messages_protocol import (
    ContentBlock,
    ContentBlockDeltaEvent,
    ContentBlockStartEvent,
    ContentBlockStopEvent,
    ImageBlockParam,
    InputJSONDelta,
    Message,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageDelta,
    MessageDeltaEvent,
    MessageDeltaUsage,
    MessageParam,
    MessageStartEvent,
    MessageStopEvent,
    MessageTokensCount,
    RedactedThinkingBlockParam,
    ServerToolParam,
    StopReason,
    TextBlock,
    TextBlockParam,
    TextDelta,
    ThinkingBlockParam,
    ToolResultBlockParam,
    ToolUseBlock,
    ToolUseBlockParam,
    Usage,
    message_id,
    tool_use_id,
)
from allinone.api.protocol import ChatCompletionRequest, ToolCall, UsageInfo
from allinone.errors import APIError, InvalidRequestError, to_api_error, validation_message
from allinone.serving.chat import (
    ChatChoice,
    ChatServing,
    ChoiceFinished,
    ChoiceStarted,
    ContentDelta,
    ToolCallEvent,
)
from allinone.serving.errors import InputError
from allinone.serving.sse import sse

if TYPE_CHECKING:
    from allinone.api.state import ServerState
    from allinone.serving.chat import EventStream

JOIN = "\n\n"
"""Between the text blocks of one turn (or of ``system``, or of a tool result): each block is
a paragraph of its own (clients such as Claude Code send instructions and the question as
separate blocks)."""

# ------------------------------------------------------------------------------- error dialect

# Anthropic's error types by status (the anthropic SDK's ``ErrorType``; 529 is its overload
# status, ``anthropic._exceptions.OverloadedError``).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}

# pydantic's tags for the member of a tagged union a block or tool was read as: the client's
# own ``type`` value (or our name for the rest), not a field.
_UNION_TAGS = {
    "text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking", "other",
    "custom", "server",
}  # fmt: skip
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class AnthropicDialect(ErrorDialect):
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}`` with its
    type names by status. The message starts with the field at fault (``max_tokens: ...``),
    since the shape has no ``param``. A full wait queue (our 503 ``overloaded_error``) is
    Anthropic's 529 ``overloaded_error``; a server that is loading or draining keeps 503, with
    the same type (the anthropic SDK retries both); 413 is ``invalid_request_error``."""

    def status(self, err: APIError) -> int:
        if err.status == 503 and err.type == "overloaded_error":
            return 529
        return err.status

    def error_type(self, err: APIError) -> str:
        """Anthropic's ``error.type`` for an error."""
        status = self.status(err)
        return _ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")

    def body(self, err: APIError) -> dict[str, Any]:
        message = err.message
        if err.param and not message.startswith(f"{err.param}:"):
            message = f"{err.param}: {message}"
        return {"type": "error", "error": {"type": self.error_type(err), "message": message}}

    def validation(self, exc: RequestValidationError) -> JSONResponse:
        errors = [{**e, "loc": _clean_loc(e.get("loc", ()))} for e in exc.errors()]
        # The union member a value was meant for fails deepest: a list of blocks with a bad
        # block also fails as a string, at ``content`` itself, which is not a second problem.
        locs = {e["loc"] for e in errors}
        errors = [e for e in errors if not any(o[: len(e["loc"])] == e["loc"] != o for o in locs)]
        errors.sort(key=lambda e: (e.get("type") != "value_error", -len(e["loc"])))
        message, param = validation_message(RequestValidationError(errors))
        return self.response(InvalidRequestError(message, param=param))


def _clean_loc(loc: tuple | list) -> tuple:
    """A validation error's location without pydantic's union member names."""
    out: list[Any] = []
    prev: object = None
    for p in loc:
        skip = p == "body" or (isinstance(p, str) and ("[" in p or p in _TYPE_TAGS))
        if isinstance(p, str) and isinstance(prev, int) and p in _UNION_TAGS:
            skip = True
        prev = p
        if not skip:
            out.append(p)
    return tuple(out)


ANTHROPIC = AnthropicDialect()

# ----------------------------------------------------------------------------------- converter

_RENAMED = {
    "stop": "stop_sequences",
    "max_completion_tokens": "max_tokens",
    "response_format": "output_config.format",
    "parallel_tool_calls": "tool_choice.disable_parallel_tool_use",
}
_HOSTED = ("container", "diagnostics", "mcp_servers", "user_profile_id", "workspace_id")
_CALL = re.compile(r"tool_calls\.(\d+)")


@dataclass
class FieldMap:
    """Where each part of the chat request came from in the Messages request, so an error the
    chat core raises names the field the client wrote (``messages.3`` of the chat request may
    be ``messages.2.content.1`` here)."""

    messages: list[str] = field(default_factory=list)  # chat message index -> Messages path
    calls: dict[tuple[int, int], str] = field(default_factory=dict)  # (message, call) -> path

    def of(self, param: str | None) -> str | None:
        """The Messages field for a chat request's field."""
        if param is None:
            return None
        head, _, rest = param.partition(".")
        index, _, tail = rest.partition(".")
        if head == "messages":
            if not index.isdigit() or int(index) >= len(self.messages):
                return "messages"
            k = int(index)
            call = _CALL.match(tail)
            if call is not None and (k, int(call.group(1))) in self.calls:
                return self.calls[k, int(call.group(1))]
            return self.messages[k]
        if head == "tools" and index.isdigit():
            name = tail.removeprefix("function.").split(".")[0]
            name = {"parameters": "input_schema", "function": ""}.get(name, name)
            return f"tools.{index}" + (f".{name}" if name else "")
        if head == "tool_choice":
            return "tool_choice.name" if param.endswith(".name") else "tool_choice"
        return _RENAMED.get(head, head)

    @contextmanager
    def naming(self) -> Iterator[None]:
        """Re-raise the chat core's input errors with the Messages field at fault."""
        try:
            yield
        except InputError as exc:
            exc.param = self.of(exc.param)
            raise


def to_chat(params: MessageCountTokensParams) -> tuple[ChatCompletionRequest, FieldMap]:
    """The chat request a Messages request (or a count_tokens request, which has no
    generation fields) asks for, and where its fields came from. InputError naming the
    Messages field for anything this server cannot honour."""
    for name in _HOSTED:
        if getattr(params, name) is not None:
            raise InputError(
                f"{name} is a feature of Anthropic's hosted service, which this server does "
                "not have; remove it",
                param=name,
            )
    fields = FieldMap()
    messages: list[dict[str, Any]] = []

    def add(message: dict[str, Any], where: str) -> None:
        messages.append(message)
        fields.messages.append(where)

    if params.system is not None:
        add({"role": "system", "content": _system_text(params.system, "system")}, "system")
    calls_before: set[str] = set()  # the ids of the previous assistant turn's tool calls
    for i, m in enumerate(params.messages):
        where = f"messages.{i}"
        if isinstance(m.content, list) and not m.content:
            raise InputError(
                "content is empty: send a string or at least one block", param=f"{where}.content"
            )
        if m.role == "system":
            add({"role": "system", "content": _system_text(m.content, f"{where}.content")}, where)
        elif m.role == "user":
            for message, at in _user_turn(m, where, calls_before):
                add(message, at)
        else:
            message, calls = _assistant_turn(m, where)
            for j, at in enumerate(calls):
                fields.calls[len(messages), j] = at
            add(message, where)
        calls_before = {c["id"] for c in messages[-1].get("tool_calls") or ()}
    if params.messages[-1].role != "user":
        raise InputError(
            "the last message must come from the user (tool results come in a user message); "
            "this server does not continue a partial assistant reply (prefill)",
            param=f"messages.{len(params.messages) - 1}.role",
        )
    data: dict[str, Any] = {"model": params.model, "messages": messages}
    data |= _tools(params)
    _thinking(params)
    fmt = params.output_config.format if params.output_config is not None else None
    if fmt is not None:
        json_schema = {"name": "output", "schema": fmt.schema_}
        data["response_format"] = {"type": "json_schema", "json_schema": json_schema}
    if isinstance(params, MessageCreateParams):
        data |= _generation(params)
    try:
        chat = ChatCompletionRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        problem = first["msg"].removeprefix("Value error, ")
        raise InputError(problem, param=fields.of(loc) or None) from None
    return chat, fields


def _texts(blocks: list, where: str, what: str) -> str:
    """Text blocks joined; anything else is refused (``what``: where such blocks go)."""
    texts = []
    for j, block in enumerate(blocks):
        if not isinstance(block, TextBlockParam):
            _refuse_block(block, f"{where}.{j}", what)
        texts.append(block.text)
    return JOIN.join(texts)


def _system_text(content: str | list, where: str) -> str:
    return content if isinstance(content, str) else _texts(content, where, "a system prompt")


def _user_turn(
    m: MessageParam, where: str, calls_before: set[str]
) -> list[tuple[dict[str, Any], str]]:
    """A user turn as chat messages: its tool results (one tool message each) and its text,
    in the order sent."""
    if isinstance(m.content, str):
        return [({"role": "user", "content": m.content}, where)]
    out: list[tuple[dict[str, Any], str]] = []
    texts: list[str] = []
    for j, block in enumerate(m.content):
        at = f"{where}.content.{j}"
        if isinstance(block, TextBlockParam):
            if not texts:
                text_at = at
            texts.append(block.text)
            continue
        if not isinstance(block, ToolResultBlockParam):
            _refuse_block(block, at, "a user message")
        if texts:
            out.append(({"role": "user", "content": JOIN.join(texts)}, text_at))
            texts = []
        if block.tool_use_id not in calls_before:
            raise InputError(
                f"no tool_use block with id {block.tool_use_id!r} in the assistant message "
                "just before: a tool_result answers a call of the previous turn",
                param=f"{at}.tool_use_id",
            )
        result = _result_text(block, at)
        out.append(({"role": "tool", "tool_call_id": block.tool_use_id, "content": result}, at))
    if texts:
        out.append(({"role": "user", "content": JOIN.join(texts)}, text_at))
    return out


def _result_text(block: ToolResultBlockParam, at: str) -> str:
    content = block.content
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        text = _texts(content, f"{at}.content", "a tool result")
    # The chat template has no error flag for a tool's answer: the model reads it in the text.
    return f"Error: {text}" if block.is_error else text


def _assistant_turn(m: MessageParam, where: str) -> tuple[dict[str, Any], list[str]]:
    """An assistant turn as one chat message (its text, then its tool calls), and the path of
    each call's block."""
    if isinstance(m.content, str):
        return {"role": "assistant", "content": m.content}, []
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    paths: list[str] = []
    for j, block in enumerate(m.content):
        at = f"{where}.content.{j}"
        if isinstance(block, TextBlockParam):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlockParam):
            if block.caller is not None and block.caller.get("type") != "direct":
                raise InputError(
                    "only calls the model made itself (caller type 'direct') can be sent: "
                    "this server runs no code execution",
                    param=f"{at}.caller",
                )
            if block.toolset_name is not None:
                raise InputError(
                    "this server has no toolsets (MCP servers)", param=f"{at}.toolset_name"
                )
            arguments = json.dumps(block.input, ensure_ascii=False)
            function = {"name": block.name, "arguments": arguments}
            calls.append({"id": block.id, "type": "function", "function": function})
            paths.append(f"{at}.input")
        elif not isinstance(block, (ThinkingBlockParam, RedactedThinkingBlockParam)):
            _refuse_block(block, at, "an assistant message")
    message: dict[str, Any] = {"role": "assistant", "content": JOIN.join(texts)}
    if calls:
        message["tool_calls"] = calls
    return message, paths


def _refuse_block(block: Any, at: str, what: str) -> NoReturn:
    """InputError for a block that cannot go where it was sent (or anywhere, here)."""
    kind = block.type
    if isinstance(block, ImageBlockParam):
        raise InputError(
            "image blocks are not supported: the served model reads text only; send text",
            param=at,
        )
    if kind in ("tool_use", "thinking", "redacted_thinking"):
        reason = f"{kind} blocks come from the assistant: send them in an assistant message"
    elif kind == "tool_result":
        reason = "tool_result blocks go in a user message, after the assistant's tool_use"
    else:
        raise InputError(
            f"content blocks of type {kind!r} are not supported here; send text, tool_use "
            "and tool_result blocks",
            param=f"{at}.type",
        )
    raise InputError(f"{reason} (not in {what})", param=f"{at}.type")


def _tools(params: MessageCountTokensParams) -> dict[str, Any]:
    """``tools``, ``tool_choice`` and ``parallel_tool_calls`` of the chat request."""
    out: dict[str, Any] = {}
    tools, names = [], set()
    for n, tool in enumerate(params.tools or ()):
        if isinstance(tool, ServerToolParam):
            raise InputError(
                f"tool type {tool.type!r} is one of Anthropic's server tools, which run on "
                "Anthropic's side; this server has none: define a custom tool (name, "
                "description, input_schema) and run it yourself",
                param=f"tools.{n}.type",
            )
        if tool.name in names:
            raise InputError(
                f"tool names must be unique: {tool.name!r} is defined twice",
                param=f"tools.{n}.name",
            )
        names.add(tool.name)
        fn: dict[str, Any] = {"name": tool.name, "parameters": tool.input_schema}
        if tool.description is not None:
            fn["description"] = tool.description
        if tool.strict is not None:
            fn["strict"] = tool.strict
        tools.append({"type": "function", "function": fn})
    choice = params.tool_choice
    if choice is not None and choice.type == "none":
        # The model answers in text, as if it had no tools: the chat core leaves them out of
        # the prompt too, and so does count_tokens this way.
        return out
    if tools:
        out["tools"] = tools
    if choice is None:
        return out
    if not tools:
        raise InputError(
            f"tool_choice {choice.type!r} needs tools: send the tools the model may use",
            param="tool_choice",
        )
    if choice.type == "tool":
        if choice.name not in names:
            raise InputError(
                f"names {choice.name!r}, which is not among tools", param="tool_choice.name"
            )
        out["tool_choice"] = {"type": "function", "function": {"name": choice.name}}
    else:
        out["tool_choice"] = "auto" if choice.type == "auto" else "required"
    if choice.disable_parallel_tool_use:
        out["parallel_tool_calls"] = False
    return out


def _thinking(params: MessageCountTokensParams) -> None:
    """``thinking``: the served model does not think. ``disabled`` is what it does;
    ``adaptive`` leaves thinking to the model, which then answers without; ``enabled`` and
    ``between_tools`` ask for thinking blocks it cannot write: 400."""
    thinking = params.thinking
    if thinking is not None and thinking.type in ("enabled", "between_tools"):
        raise InputError(
            f"the served model does not think, so thinking {thinking.type!r} cannot be "
            'honoured; send {"type": "disabled"} (or "adaptive"), or leave thinking out',
            param="thinking.type",
        )


def _generation(params: MessageCreateParams) -> dict[str, Any]:
    """The sampling fields of the chat request."""
    out: dict[str, Any] = {"max_tokens": params.max_tokens, "stream": params.stream}
    if params.temperature is not None:
        out["temperature"] = params.temperature
    if params.top_p is not None:
        out["top_p"] = params.top_p
    if params.top_k:  # 0: off
        out["top_k"] = params.top_k
    stops = params.stop_sequences
    if stops:
        if len(stops) > 4 or not all(stops):
            raise InputError("up to 4 non-empty strings", param="stop_sequences")
        out["stop"] = stops
    return out


# ---------------------------------------------------------------------------------- formatters


def usage_of(usage: UsageInfo) -> Usage:
    """Anthropic's counts: prompt tokens reused from the cache apart from those evaluated."""
    cached = usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
    return Usage(
        input_tokens=usage.prompt_tokens - cached,
        output_tokens=usage.completion_tokens,
        cache_read_input_tokens=cached,
    )


def stop_reason(
    reason: str, stop_sequence: str | None, stops: list[str]
) -> tuple[StopReason, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence`` for a chat finish reason. Only the
    client's own stop sequences are reported (the core may stop at strings of its own)."""
    if reason == "tool_calls":
        return "tool_use", None
    if stop_sequence is not None and stop_sequence in stops:
        return "stop_sequence", stop_sequence
    if reason == "length":
        return "max_tokens", None
    return "end_turn", None


def _tool_use(call: ToolCall, arguments: dict[str, Any] | None = None) -> ToolUseBlock:
    if arguments is None:
        arguments = json.loads(call.function.arguments)
    return ToolUseBlock(id=tool_use_id(call.id), name=call.function.name, input=arguments)


def message_of(choice: ChatChoice, usage: UsageInfo, params: MessageCreateParams) -> Message:
    """The Message for a finished chat choice: its text (if any, or if there is nothing
    else), then one ``tool_use`` block per call."""
    content: list[ContentBlock] = []
    if choice.content or not choice.tool_calls:
        content.append(TextBlock(text=choice.content or ""))
    content += [_tool_use(c) for c in choice.tool_calls]
    reason, sequence = stop_reason(
        choice.finish_reason, choice.stop_sequence, params.stop_sequences or []
    )
    return Message(
        model=params.model,
        content=content,
        stop_reason=reason,
        stop_sequence=sequence,
        usage=usage_of(usage),
    )


def _frame(event: BaseModel) -> str:
    return sse(event.model_dump(mode="json"), event=event.type)  # type: ignore[attr-defined]


@dataclass
class MessageStream:
    """The SSE frames of one streamed Message, in Anthropic's order: ``message_start``, per
    block ``content_block_start``, its deltas and ``content_block_stop`` (blocks never
    interleave: text, then one ``tool_use`` block per call), ``message_delta`` with the stop
    reason and the usage, ``message_stop``.

    ``message_start`` goes before the prompt is evaluated, so its ``usage`` has zeros; the
    counts come with ``message_delta`` (cumulative, as Anthropic's; the SDK takes them)."""

    model: str
    stops: list[str]
    id: str = field(default_factory=message_id)
    blocks: int = 0  # blocks started
    text_open: bool = False

    def start(self) -> str:
        message = Message(
            id=self.id,
            model=self.model,
            content=[],
            stop_reason=None,
            usage=Usage(input_tokens=0, output_tokens=0),
        )
        return _frame(MessageStartEvent(message=message))

    def _open(self, block: ContentBlock) -> str:
        self.blocks += 1
        return _frame(ContentBlockStartEvent(index=self.blocks - 1, content_block=block))

    def _close_text(self) -> list[str]:
        if not self.text_open:
            return []
        self.text_open = False
        return [_frame(ContentBlockStopEvent(index=self.blocks - 1))]

    def text(self, text: str) -> list[str]:
        """Frames for a piece of text (a text block opens with the first piece)."""
        if not text:
            return []
        frames = [] if self.text_open else [self._open(TextBlock(text=""))]
        self.text_open = True
        delta = TextDelta(text=text)
        return [*frames, _frame(ContentBlockDeltaEvent(index=self.blocks - 1, delta=delta))]

    def tool_call(self, call: ToolCall) -> list[str]:
        """Frames of one whole tool call: its block, with the input as one JSON piece."""
        frames = self._close_text()
        frames.append(self._open(_tool_use(call, {})))
        piece = InputJSONDelta(partial_json=call.function.arguments)
        frames.append(_frame(ContentBlockDeltaEvent(index=self.blocks - 1, delta=piece)))
        frames.append(_frame(ContentBlockStopEvent(index=self.blocks - 1)))
        return frames

    def finish(self, event: ChoiceFinished) -> list[str]:
        """The closing frames (an empty reply still has its one, empty, text block)."""
        frames = []
        if self.blocks == 0:
            frames.append(self._open(TextBlock(text="")))
            self.text_open = True
        frames += self._close_text()
        reason, sequence = stop_reason(event.reason, event.stop_sequence, self.stops)
        usage = usage_of(event.usage)
        counts = MessageDeltaUsage(
            output_tokens=usage.output_tokens,
            input_tokens=usage.input_tokens,
            cache_creation_input_tokens=usage.cache_creation_input_tokens,
            cache_read_input_tokens=usage.cache_read_input_tokens,
        )
        delta = MessageDelta(stop_reason=reason, stop_sequence=sequence)
        frames.append(_frame(MessageDeltaEvent(delta=delta, usage=counts)))
        frames.append(_frame(MessageStopEvent()))
        return frames

    @staticmethod
    def error(err: APIError) -> str:
        """Anthropic's ``error`` event (a failure mid-stream; the stream ends after it)."""
        return sse(ANTHROPIC.body(err), event="error")


async def _frames(events: EventStream, out: MessageStream) -> AsyncIterator[str]:
    try:
        yield out.start()
        async for ev in events:
            if isinstance(ev, ContentDelta) or (isinstance(ev, ChoiceStarted) and ev.text):
                # (ChoiceStarted carries text only for a label task's whole answer)
                for frame in out.text(ev.text):
                    yield frame
            elif isinstance(ev, ToolCallEvent):
                for frame in out.tool_call(ev.call):
                    yield frame
            elif isinstance(ev, ChoiceFinished):
                for frame in out.finish(ev):
                    yield frame
    except Exception as exc:  # mid-stream: one error event, then the stream ends
        yield out.error(to_api_error(exc, param="messages"))
    finally:
        await events.aclose()


class MessagesServing:
    """Serves Messages requests for one HTTP request (``request``: its Starlette request)."""

    def __init__(self, state: ServerState, request: Any = None) -> None:
        self.chat = ChatServing(state, request)

    async def create(self, params: MessageCreateParams) -> Message:
        """The whole reply."""
        body, fields = to_chat(params)
        with fields.naming():
            outcome = await self.chat.create(body)
        return message_of(outcome.choices[0], outcome.usage, params)

    async def stream(self, params: MessageCreateParams) -> AsyncIterator[str]:
        """Check and submit now (input errors are raised here, before a byte is sent); then
        the reply's SSE frames."""
        body, fields = to_chat(params)
        with fields.naming():
            events = await self.chat.stream(body)
        return _frames(events, MessageStream(params.model, params.stop_sequences or []))

    def count_tokens(self, params: MessageCountTokensParams) -> MessageTokensCount:
        """The prompt's tokens, rendered as ``create`` would (no inference)."""
        body, fields = to_chat(params)
        with fields.naming():
            return MessageTokensCount(input_tokens=self.chat.count_tokens(body))
