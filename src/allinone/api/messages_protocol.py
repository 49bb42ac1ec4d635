"""Wire models of Anthropic's Messages API (``POST /v1/messages``, ``/v1/messages/count_tokens``),
named after the anthropic SDK's types (2.17.0: ``MessageCreateParams``, ``Message`` ...).

The request models take every field the SDK sends; which of them are honoured, accepted with
no effect, or refused by name is the converter's business (``allinone.serving.messages``), so
each refusal can say why. A field outside these models is a 400 naming it.
"""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from allinone.api.protocol import Name, Text

# ---------------------------------------------------------------------------------- requests


class _Block(BaseModel):
    """Fields every request block may carry. ``cache_control`` is accepted with no effect: the
    server reuses a prompt's cached prefix on its own."""

    model_config = ConfigDict(extra="forbid")
    cache_control: dict[str, Any] | None = None


class TextBlockParam(_Block):
    """``{"type": "text", "text"}``; ``citations`` (echoed from an earlier reply) do not reach
    the model."""

    type: Literal["text"]
    text: Text
    citations: list[dict[str, Any]] | None = None


class ImageBlockParam(_Block):
    """An image: parsed so that the refusal can name it (the served model reads text only)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["image"]
    source: dict[str, Any] | None = None


class ToolUseBlockParam(_Block):
    """An earlier tool call of the assistant: ``input`` is the arguments object."""

    type: Literal["tool_use"]
    id: Text = Field(min_length=1)
    name: Name
    input: dict[str, Any]
    caller: dict[str, Any] | None = None
    toolset_name: Text | None = None


class ToolResultBlockParam(_Block):
    """The result of tool call ``tool_use_id``: text (a string or text blocks), flagged with
    ``is_error`` when the tool failed."""

    type: Literal["tool_result"]
    tool_use_id: Text = Field(min_length=1)
    content: Text | list[ContentBlockParam] | None = None
    is_error: bool | None = None
    toolset_name: Text | None = None


class ThinkingBlockParam(_Block):
    """Earlier thinking of the assistant (from another model: this one does not think)."""

    type: Literal["thinking"]
    thinking: Text
    signature: str = ""


class RedactedThinkingBlockParam(_Block):
    """Earlier thinking, encrypted by its provider."""

    type: Literal["redacted_thinking"]
    data: str


class OtherBlockParam(BaseModel):
    """Any other block type (``document``, ``search_result``, ``server_tool_use``,
    ``web_search_tool_result`` ...): parsed so that the refusal names its ``type``."""

    model_config = ConfigDict(extra="allow")
    type: str


_BLOCK_TYPES = {"text", "image", "tool_use", "tool_result", "thinking", "redacted_thinking"}


def _block_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    if not isinstance(kind, str):
        return None  # pydantic: "unable to extract tag" (no or a non-string ``type``)
    return kind if kind in _BLOCK_TYPES else "other"


ContentBlockParam = Annotated[
    Annotated[TextBlockParam, Tag("text")]
    | Annotated[ImageBlockParam, Tag("image")]
    | Annotated[ToolUseBlockParam, Tag("tool_use")]
    | Annotated[ToolResultBlockParam, Tag("tool_result")]
    | Annotated[ThinkingBlockParam, Tag("thinking")]
    | Annotated[RedactedThinkingBlockParam, Tag("redacted_thinking")]
    | Annotated[OtherBlockParam, Tag("other")],
    Discriminator(
        _block_kind,
        custom_error_type="invalid_block",
        custom_error_message="a content block is an object with a string 'type' "
        "('text', 'tool_use', 'tool_result' ...)",
    ),
]
"""One block of a message's ``content``, chosen by its ``type``."""

ToolResultBlockParam.model_rebuild()


class MessageParam(BaseModel):
    """One turn: ``user``, ``assistant`` or ``system`` (the SDK's ``SystemMessageParam``);
    ``content`` is a string or a list of blocks."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["user", "assistant", "system"]
    content: Text | list[ContentBlockParam]


class CustomToolParam(BaseModel):
    """A tool the client runs: name, description and the JSON schema of its ``input``.
    ``eager_input_streaming`` is accepted with no effect (a call's input is streamed whole
    once the call is complete)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["custom"] | None = None
    name: Name
    description: Text | None = None
    input_schema: dict[str, Any]
    strict: bool | None = None
    cache_control: dict[str, Any] | None = None
    eager_input_streaming: bool | None = None


class ServerToolParam(BaseModel):
    """A tool Anthropic runs on its side (``web_search_20250305``, ``bash_20250124``,
    ``code_execution_*`` ...): parsed so that the refusal names its ``type``."""

    model_config = ConfigDict(extra="allow")
    type: str


def _tool_kind(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    return "custom" if value.get("type") in (None, "custom") else "server"


ToolUnionParam = Annotated[
    Annotated[CustomToolParam, Tag("custom")] | Annotated[ServerToolParam, Tag("server")],
    Discriminator(
        _tool_kind,
        custom_error_type="invalid_tool",
        custom_error_message="a tool is an object: name, description, input_schema",
    ),
]


class ToolChoiceParam(BaseModel):
    """``{"type": "auto" | "any" | "none"}`` or ``{"type": "tool", "name"}``, with
    ``disable_parallel_tool_use`` (not with ``none``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["auto", "any", "tool", "none"]
    name: Name | None = None
    disable_parallel_tool_use: bool | None = None

    @model_validator(mode="after")
    def _named(self) -> ToolChoiceParam:
        if self.type == "tool" and self.name is None:
            raise ValueError('type "tool" needs the name of the tool to call')
        if self.type != "tool" and self.name is not None:
            raise ValueError(f'name goes with type "tool", not {self.type!r}')
        if self.type == "none" and self.disable_parallel_tool_use is not None:
            raise ValueError('disable_parallel_tool_use does not go with type "none"')
        return self


class ThinkingConfigParam(BaseModel):
    """``thinking``: ``{"type": "enabled", "budget_tokens"}``, ``disabled``, ``adaptive`` or
    ``between_tools`` (what the converter makes of each: ``allinone.serving.messages``)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["enabled", "disabled", "adaptive", "between_tools"]
    budget_tokens: int | None = None
    display: Literal["summarized", "omitted"] | None = None


class JSONOutputFormatParam(BaseModel):
    """``output_config.format``: the reply is JSON valid under ``schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["json_schema"]
    schema_: dict[str, Any] = Field(alias="schema")


class OutputConfigParam(BaseModel):
    """``output_config``: ``format`` is honoured; ``effort`` is accepted with no effect."""

    model_config = ConfigDict(extra="forbid")
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: JSONOutputFormatParam | None = None


class MessageCountTokensParams(BaseModel):
    """POST /v1/messages/count_tokens: the prompt part of a Messages request.

    Accepted with no effect: ``cache_control``, ``speed``. Refused by name (hosted features of
    Anthropic's service): ``container``, ``diagnostics``, ``mcp_servers``, ``user_profile_id``,
    ``workspace_id``."""

    model_config = ConfigDict(extra="forbid")
    model: Text = Field(min_length=1, description="The served model's id, or a task name")
    messages: list[MessageParam] = Field(min_length=1)
    system: Text | list[TextBlockParam] | None = None
    tools: list[ToolUnionParam] | None = Field(None, max_length=128)
    tool_choice: ToolChoiceParam | None = None
    thinking: ThinkingConfigParam | None = None
    output_config: OutputConfigParam | None = None
    cache_control: dict[str, Any] | None = None
    speed: Literal["standard", "fast"] | None = None
    container: Any = None
    diagnostics: Any = None
    mcp_servers: Any = None
    user_profile_id: Any = None
    workspace_id: Any = None


class MessageCreateParams(MessageCountTokensParams):
    """POST /v1/messages.

    Accepted with no effect besides the above: ``metadata``, ``service_tier``,
    ``inference_geo``."""

    max_tokens: int = Field(ge=1, le=32768, description="The reply's length cap, in tokens")
    stop_sequences: list[Text] | None = None
    stream: bool = False
    temperature: float | None = Field(
        None, ge=0.0, le=1.0, description="Default: the task's (0, greedy)"
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1, description="0: off")
    metadata: dict[str, Any] | None = None
    service_tier: Literal["auto", "standard_only"] | None = None
    inference_geo: Text | None = None


# --------------------------------------------------------------------------------- responses

StopReason = Literal[
    "end_turn",
    "max_tokens",
    "stop_sequence",
    "tool_use",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
]


def message_id() -> str:
    """A fresh message id (Anthropic's ``msg_`` prefix)."""
    return f"msg_{uuid.uuid4().hex[:24]}"


def tool_use_id(call_id: str) -> str:
    """A tool call's id with Anthropic's ``toolu_`` prefix (the chat core's ids are
    ``call_<hex>``; the same hex is kept)."""
    return call_id if call_id.startswith("toolu_") else f"toolu_{call_id.removeprefix('call_')}"


class TextBlock(BaseModel):
    """Reply text."""

    type: Literal["text"] = "text"
    text: str
    citations: None = None


class ToolUseBlock(BaseModel):
    """A tool call: the client runs ``name`` with ``input`` and answers with a ``tool_result``
    block naming ``id``."""

    type: Literal["tool_use"] = "tool_use"
    id: str
    name: str
    input: dict[str, Any]


ContentBlock = Annotated[TextBlock | ToolUseBlock, Field(discriminator="type")]


class Usage(BaseModel):
    """Token counts, as Anthropic counts them: ``input_tokens`` are the prompt tokens that were
    evaluated, ``cache_read_input_tokens`` those reused from the server's prompt cache (their
    sum is the prompt, what count_tokens answers); the server writes no explicit cache, so
    ``cache_creation_input_tokens`` is 0."""

    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class Message(BaseModel):
    """A reply (non-streamed, and the ``message`` of ``message_start``)."""

    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    model: str
    content: list[ContentBlock]
    stop_reason: StopReason | None
    stop_sequence: str | None = None
    usage: Usage


class MessageTokensCount(BaseModel):
    """count_tokens' answer: the prompt's tokens."""

    input_tokens: int


# ------------------------------------------------------------------------------ stream events


class TextDelta(BaseModel):
    type: Literal["text_delta"] = "text_delta"
    text: str


class InputJSONDelta(BaseModel):
    """A piece of a tool call's ``input`` as JSON text; the pieces join to the whole JSON."""

    type: Literal["input_json_delta"] = "input_json_delta"
    partial_json: str


class MessageStartEvent(BaseModel):
    type: Literal["message_start"] = "message_start"
    message: Message


class ContentBlockStartEvent(BaseModel):
    type: Literal["content_block_start"] = "content_block_start"
    index: int
    content_block: ContentBlock


class ContentBlockDeltaEvent(BaseModel):
    type: Literal["content_block_delta"] = "content_block_delta"
    index: int
    delta: TextDelta | InputJSONDelta


class ContentBlockStopEvent(BaseModel):
    type: Literal["content_block_stop"] = "content_block_stop"
    index: int


class MessageDelta(BaseModel):
    stop_reason: StopReason | None
    stop_sequence: str | None = None


class MessageDeltaUsage(BaseModel):
    """Cumulative counts at the end of the message (the SDK overwrites its snapshot's)."""

    output_tokens: int
    input_tokens: int | None = None
    cache_creation_input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDeltaEvent(BaseModel):
    type: Literal["message_delta"] = "message_delta"
    delta: MessageDelta
    usage: MessageDeltaUsage


class MessageStopEvent(BaseModel):
    type: Literal["message_stop"] = "message_stop"


StreamEvent = (
    MessageStartEvent
    | ContentBlockStartEvent
    | ContentBlockDeltaEvent
    | ContentBlockStopEvent
    | MessageDeltaEvent
    | MessageStopEvent
)
