"""Wire models of OpenAI's Responses API (``POST /v1/responses``), named as vLLM names them
(``ResponsesRequest``, ``ResponsesResponse``); field names and shapes are the openai SDK's
(``openai/types/responses/``).

The request is read strictly: an unknown field is a 400 naming it. Fields that need state or
hosted features this server does not have are declared here, so that the serving layer can
refuse each by name with a reason (``allinone.serving.responses``). Tools and ``tool_choice`` are
read loosely here and checked there, so that an error names the Responses field
(``tools.1.name``), not a member of a union.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from allinone.api.protocol import LogprobEntry, Name, Text

# -- request ---------------------------------------------------------------------------------


class InputTextPart(BaseModel):
    """``{type: "input_text", text}``: text from the user (or a system/developer message)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["input_text"]
    text: Text
    prompt_cache_breakpoint: Any = None  # a caching hint; this server caches prompts anyway


class OutputTextPart(BaseModel):
    """``{type: "output_text", text, annotations}``: an earlier reply's text sent back."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["output_text"]
    text: Text
    annotations: list[Any] | None = None  # echoed from an earlier reply; not for the model
    logprobs: list[Any] | None = None


class RefusalPart(BaseModel):
    """``{type: "refusal", refusal}``: an earlier reply's refusal sent back."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["refusal"]
    refusal: Text


class OtherPart(BaseModel):
    """A content part of any other type (images, files, audio): refused by name when read."""

    model_config = ConfigDict(extra="allow")
    type: Any = None


_PART_TYPES = ("input_text", "output_text", "refusal")


def _part_kind(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    return kind if kind in _PART_TYPES else "other"


ContentPart = Annotated[
    Annotated[InputTextPart, Tag("input_text")]
    | Annotated[OutputTextPart, Tag("output_text")]
    | Annotated[RefusalPart, Tag("refusal")]
    | Annotated[OtherPart, Tag("other")],
    Discriminator(_part_kind),
]


def _json_kind(value: Any) -> str:
    return "str" if isinstance(value, str) else "list"


# Tagged by JSON type, so that an error names the field (``input.0.content``), not the union
# member it failed ("str", "list[...]").
MessageContent = Annotated[
    Annotated[Text, Tag("str")] | Annotated[list[ContentPart], Tag("list")],
    Discriminator(_json_kind),
]


class InputMessage(BaseModel):
    """A message item: an easy message (``{role, content}``, ``type`` optional), a message
    with content parts, or an earlier reply's output message sent back (its ``id``, ``status``
    and ``phase`` are accepted and do not reach the model)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["message"] = "message"
    role: Literal["user", "assistant", "system", "developer"]
    content: MessageContent
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    phase: Literal["commentary", "final_answer"] | None = None


class FunctionCallItem(BaseModel):
    """``{type: "function_call", call_id, name, arguments}``: a call an earlier reply made."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call"]
    call_id: Text = Field(min_length=1)
    name: Name
    arguments: Text
    id: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


OutputContent = Annotated[
    Annotated[Text, Tag("str")] | Annotated[list[ContentPart], Tag("list")],
    Discriminator(_json_kind),
]


class FunctionCallOutputItem(BaseModel):
    """``{type: "function_call_output", call_id, output}``: a function's result."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function_call_output"]
    call_id: Text = Field(min_length=1)
    output: OutputContent
    id: Text | None = None
    name: Text | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None


class OtherItem(BaseModel):
    """An input item of any other type (``reasoning``, ``item_reference``, hosted tools'
    calls): refused by name when read."""

    model_config = ConfigDict(extra="allow")
    type: Any = None


_ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_kind(value: Any) -> str:
    if not isinstance(value, dict):
        return "message"  # not an object: the message model says what it should be
    kind = value.get("type")
    if kind is None:
        return "message"  # an easy message may leave ``type`` out
    return kind if kind in _ITEM_TYPES else "other"


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[OtherItem, Tag("other")],
    Discriminator(_item_kind),
]

Input = Annotated[
    Annotated[Text, Tag("str")] | Annotated[list[InputItem], Tag("list")],
    Discriminator(_json_kind),
]


class TextFormat(BaseModel):
    """``text.format``: ``{type: "text"}``, ``{type: "json_object"}`` or
    ``{type: "json_schema", name, schema, description?, strict?}`` (flat, unlike chat's
    ``response_format.json_schema``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"]
    name: Name | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: Text | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _fields_of_type(self) -> TextFormat:
        if self.type == "json_schema":
            if self.name is None or self.schema_ is None:
                raise ValueError('type "json_schema" needs a name and a schema')
        elif any(v is not None for v in (self.name, self.schema_, self.description, self.strict)):
            raise ValueError(
                f'name, schema, description and strict go with type "json_schema", not '
                f'"{self.type}"'
            )
        return self


class TextConfig(BaseModel):
    """``text``: the reply's format and verbosity."""

    model_config = ConfigDict(extra="forbid")
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None


class FunctionTool(BaseModel):
    """An entry of ``tools``: ``{type: "function", name, description?, parameters, strict}``
    (flat, unlike chat's ``{type, function: {...}}``). Read by the serving layer, so that an
    error names ``tools.N.<field>``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: Name
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionToolChoice(BaseModel):
    """``tool_choice: {type: "function", name}``: the model must call this function."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    name: Name


class StreamOptions(BaseModel):
    """``stream_options``: this server never pads events, so obfuscation has nothing to do."""

    model_config = ConfigDict(extra="forbid")
    include_obfuscation: bool | None = None


Includable = Literal[
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "reasoning.encrypted_content",
    "message.output_text.logprobs",
]
LOGPROBS = "message.output_text.logprobs"
_STATELESS = "Nothing is stored (the server is stateless)"

# OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
Metadata = dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]]


class ResponsesRequest(BaseModel):
    """POST /v1/responses."""

    model_config = ConfigDict(extra="forbid")
    model: Text = Field(min_length=1, description="The served model's id, or a task name")
    input: Input = Field(
        description="Text (one user message), or a list of items: messages, function_call "
        "and function_call_output"
    )
    instructions: Text | None = Field(None, description="Sent as a leading system message")
    max_output_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default: the task's (0)")
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    tools: list[dict[str, Any]] | None = Field(
        None,
        max_length=128,
        description="Function tools only: {type: 'function', name, description, parameters, "
        "strict}",
    )
    tool_choice: Text | dict[str, Any] | None = Field(
        None, description="'none', 'auto', 'required' or {type: 'function', name}"
    )
    parallel_tool_calls: bool | None = None
    include: list[Includable] | None = Field(
        None, description=f"{LOGPROBS!r} returns the reply's token log-probabilities"
    )
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: Literal["auto", "disabled"] | None = None
    metadata: Metadata | None = Field(
        None, max_length=16, description="Up to 16 string pairs, echoed back"
    )
    max_tool_calls: int | None = Field(
        None, ge=1, description="Limits calls to built-in tools, which this server has none of"
    )
    # No effect on the reply: accepted and not used (as on every route).
    user: Text | None = None
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    prompt_cache_retention: Literal["in_memory", "24h"] | None = None
    service_tier: Text | None = None
    # Refused by name when set (``allinone.serving.responses.REFUSED`` says why).
    store: bool | None = Field(None, description=f"{_STATELESS}: true is refused")
    background: bool | None = Field(None, description=f"{_STATELESS}: true is refused")
    reasoning: Any = Field(None, description="Refused: the served model does not reason")
    previous_response_id: Any = Field(None, description=f"{_STATELESS}: refused")
    conversation: Any = Field(None, description=f"{_STATELESS}: refused")
    prompt: Any = Field(None, description="Refused: no stored prompt templates")
    context_management: Any = Field(None, description=f"{_STATELESS}: refused")
    moderation: Any = Field(None, description="Refused: no moderation model")
    prompt_cache_options: Any = Field(None, description="Refused: the cache takes no options")
    image: Any = Field(None, description="Refused: no image model")
    access_programs: Any = Field(None, description="Refused")


# -- response --------------------------------------------------------------------------------


def response_id() -> str:
    """A fresh response id."""
    return f"resp_{uuid.uuid4().hex}"


def message_id() -> str:
    """A fresh output message id."""
    return f"msg_{uuid.uuid4().hex}"


def function_call_id() -> str:
    """A fresh function call item id (the call's ``call_id`` is the chat tool call's id)."""
    return f"fc_{uuid.uuid4().hex}"


class OutputText(BaseModel):
    """A reply's text: ``annotations`` always empty, ``logprobs`` empty unless asked for."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = Field(default_factory=list)
    logprobs: list[LogprobEntry] = Field(default_factory=list)


class OutputMessage(BaseModel):
    """The assistant's message item."""

    id: str = Field(default_factory=message_id)
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"
    content: list[OutputText] = Field(default_factory=list)


class FunctionToolCall(BaseModel):
    """A function call item: ``call_id`` is what a ``function_call_output`` answers."""

    id: str = Field(default_factory=function_call_id)
    type: Literal["function_call"] = "function_call"
    call_id: str
    name: str
    arguments: str
    status: Literal["in_progress", "completed", "incomplete"] = "in_progress"


OutputItem = OutputMessage | FunctionToolCall


class InputTokensDetails(BaseModel):
    """``cached_tokens``: prompt tokens not evaluated again (a cached prefix)."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class ResponseUsage(BaseModel):
    """Token counts of a response."""

    input_tokens: int
    input_tokens_details: InputTokensDetails = Field(default_factory=InputTokensDetails)
    output_tokens: int
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class ResponseError(BaseModel):
    """Why a response failed (mid-stream)."""

    code: str
    message: str


class IncompleteDetails(BaseModel):
    reason: Literal["max_output_tokens", "content_filter"]


class ResponsesResponse(BaseModel):
    """A response object (``object: "response"``), also the ``response`` of the stream's
    ``response.created`` / ``.in_progress`` / ``.completed`` / ``.incomplete`` /
    ``.failed`` events. The request's settings are echoed; ``store`` is always false."""

    id: str = Field(default_factory=response_id)
    object: Literal["response"] = "response"
    created_at: int = Field(default_factory=lambda: int(time.time()))
    status: Literal["completed", "failed", "in_progress", "incomplete"] = "in_progress"
    completed_at: int | None = None
    error: ResponseError | None = None
    incomplete_details: IncompleteDetails | None = None
    instructions: str | None = None
    max_output_tokens: int | None = None
    max_tool_calls: int | None = None
    model: str
    output: list[OutputItem] = Field(default_factory=list)
    parallel_tool_calls: bool = True
    previous_response_id: None = None
    reasoning: None = None
    service_tier: str = "default"
    store: bool = False
    temperature: float | None = None
    text: dict[str, Any] = Field(
        default_factory=lambda: {"format": {"type": "text"}, "verbosity": "medium"}
    )
    tool_choice: str | dict[str, Any] = "auto"
    tools: list[dict[str, Any]] = Field(default_factory=list)
    top_logprobs: int | None = None
    top_p: float | None = None
    truncation: Literal["auto", "disabled"] = "disabled"
    usage: ResponseUsage | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
