"""From an OpenAI chat request to what the engine takes: messages for the chat template, tools,
and the sampling options beyond temperature (grammar, logit bias, penalties, logprobs, top_k,
min_p, repetition_penalty).

Every field a client sets is either honoured or refused with a 400 that names it; nothing is
dropped on the way (a backend that cannot honour a field refuses it here too)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any

from allinone.api.protocol import ChatCompletionRequest
from allinone.api.tool_calls import CLOSE, OPEN, required_call_grammar, template_speaks_tools
from allinone.backends.base import Backend, GrammarError
from allinone.errors import InvalidRequestError


def chat_messages(body: ChatCompletionRequest) -> list[dict[str, Any]]:
    """The messages as the chat template takes them: text content, ``developer`` as
    ``system``, tool calls with their arguments as objects (Hugging Face's convention)."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(body.messages):
        try:
            text = m.text()
        except ValueError as exc:
            raise InvalidRequestError(str(exc), param=f"messages.{i}.content") from exc
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role}
        msg["content"] = text
        if m.tool_calls:
            if m.role != "assistant":
                raise InvalidRequestError(
                    "only assistant messages carry tool_calls", param=f"messages.{i}.tool_calls"
                )
            msg["tool_calls"] = [_call(i, j, c) for j, c in enumerate(m.tool_calls)]
        if m.role == "tool":
            if not m.tool_call_id:
                raise InvalidRequestError(
                    "a tool message needs the tool_call_id of the call it answers",
                    param=f"messages.{i}.tool_call_id",
                )
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _call(i: int, j: int, call) -> dict[str, Any]:
    # (its name was checked as the request was read: protocol.Name)
    where = f"messages.{i}.tool_calls.{j}.function"
    try:
        args = json.loads(call.function.arguments or "{}")
    except (ValueError, RecursionError):  # (nesting deeper than the decoder's recursion limit)
        args = None
    if not isinstance(args, dict):
        raise InvalidRequestError(
            "arguments must be a JSON object written as a string", param=f"{where}.arguments"
        )
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": args},
    }


@dataclass
class ChatOptions:
    """What a chat request adds to plain sampling."""

    options: dict[str, Any] = field(default_factory=dict)  # GenerationParams fields
    tools: list[dict] | None = None  # for the chat template
    tool_names: set[str] | None = None  # parse the reply for calls of these functions
    stop: list[str] = field(default_factory=list)  # extra stop strings


def _require(backend: Backend, feature: str, param: str) -> None:
    if feature not in backend.capabilities:
        raise InvalidRequestError(
            f"the {backend.name} backend does not support {param}; remove it", param=param
        )


async def chat_options(
    body: ChatCompletionRequest, backend: Backend, task_schema: dict | None = None
) -> ChatOptions:
    """Check and compile everything beyond messages and temperature. Grammars compile in a
    worker thread (the first one may wait for the vocabulary index). 400 naming the field for
    anything the backend cannot honour or a schema that cannot be compiled. ``task_schema``:
    a chat task's ``output.json_schema``, used when the client sends no response_format."""
    out = ChatOptions()
    if body.logit_bias:
        _require(backend, "logit_bias", "logit_bias")
        out.options["logit_bias"] = body.token_bias()
    if body.presence_penalty or body.frequency_penalty:
        which = "presence_penalty" if body.presence_penalty else "frequency_penalty"
        _require(backend, "penalties", which)
        out.options["presence_penalty"] = body.presence_penalty
        out.options["frequency_penalty"] = body.frequency_penalty
    for name, value in body.sampling_extras().items():
        _require(backend, name, name)
        out.options[name] = value
    if body.logprobs:
        _require(backend, "logprobs", "logprobs")
        out.options["logprobs"] = True
        out.options["top_logprobs"] = body.top_logprobs or 0
    fmt = body.response_format
    wants_json = fmt is not None and fmt.type != "text"
    calling = bool(body.tools) and body.tool_choice != "none"
    if wants_json and calling:
        raise InvalidRequestError(
            "send either response_format or tools (with tool_choice other than 'none'), "
            "not both: a reply is either JSON or tool calls",
            param="response_format",
        )
    if wants_json:
        assert fmt is not None
        _require(backend, "grammar", "response_format")
        schema = fmt.json_schema.schema_ if fmt.json_schema is not None else None
        out.options["grammar"] = await _compile(backend.json_grammar, schema, "response_format")
    elif task_schema is not None and fmt is None and not calling:
        _require(backend, "grammar", "model")
        out.options["grammar"] = await _compile(backend.json_grammar, task_schema or None, "model")
    if calling:
        assert body.tools is not None
        if not template_speaks_tools(backend.chat_template_source()):
            raise InvalidRequestError(
                f"the model {backend.model_id}'s chat template does not render tools in the "
                "<tool_call> format this server parses; use a model whose template does "
                "(e.g. Qwen2.5) or send no tools",
                param="tools",
            )
        out.tools = [t.model_dump(exclude_none=True) for t in body.tools]
        out.tool_names = {t.function.name for t in body.tools}
        choice = body.tool_choice or "auto"
        only = None if isinstance(choice, str) else choice.function.name
        if only is not None and only not in out.tool_names:
            raise InvalidRequestError(
                f"tool_choice names {only!r}, which is not among tools", param="tool_choice"
            )
        if choice == "required" or only is not None:
            _require(backend, "grammar", "tool_choice")
            source = required_call_grammar(body.tools, only, _tag_ids(backend))
            out.options["grammar"] = await _compile(backend.lark_grammar, source, "tools")
        elif not body.parallel_tool_calls:
            out.stop.append(CLOSE)  # one call at most: stop where the first one closes
    elif body.tools:  # tool_choice "none": the model answers in text, as if it had no tools
        pass
    return out


def _tag_ids(backend: Backend) -> tuple[int, int] | None:
    """The ids of ``<tool_call>`` and ``</tool_call>`` when each is one vocabulary token."""
    ids = [backend.tokenize(tag, special=True) for tag in (OPEN, CLOSE)]
    return (ids[0][0], ids[1][0]) if all(len(i) == 1 for i in ids) else None


async def _compile(compile_fn, source: Any, param: str) -> Any:
    try:
        return await asyncio.to_thread(compile_fn, source)
    except GrammarError as exc:
        raise InvalidRequestError(
            f"the grammar engine cannot compile this schema: {exc}", param=param
        ) from None
