"""Wire models, named after OpenAI's (``ChatCompletionRequest`` ...), plus the task endpoints'."""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from allinone.api.json_text import invalid_text, unicode_problem
from allinone.serving.sse import sse


def _valid_text(value: str) -> str:
    """Reject text that is not valid Unicode (``unicode_problem``). One rule for every text
    field of every route, and for every string of a JSON body (``json_text``): 400 naming the
    field, never a silent replacement."""
    problem = unicode_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


Text = Annotated[str, AfterValidator(_valid_text)]
"""A ``str`` field that must be valid Unicode (no lone surrogates)."""

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _valid_name(value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"a name is 1 to 64 letters (a-z, A-Z), digits, '_' or '-', not {value[:80]!r}"
        )
    return value


Name = Annotated[str, AfterValidator(_valid_name)]
"""A function's or a schema's name, by OpenAI's rule (``^[a-zA-Z0-9_-]{1,64}$``), the same
wherever it is sent: tool definitions, earlier tool calls, ``tool_choice``, ``json_schema``."""


class ContentPart(BaseModel):
    """One part of a multi-part message; only text parts are supported."""

    model_config = ConfigDict(extra="allow")
    type: str
    text: Text | None = None


class FunctionCall(BaseModel):
    """A called function: its name and its arguments as a JSON text (OpenAI's shape)."""

    name: Name
    arguments: Text

    @field_validator("arguments")
    @classmethod
    def _arguments_text(cls, v: str) -> str:
        # The arguments are JSON inside a string: its escapes decode only when the call is read,
        # so the text rule applies to what they decode to as well.
        try:
            decoded = json.loads(v)
        except (ValueError, RecursionError):
            return v  # not JSON: the chat route says so, naming the field
        found = invalid_text(decoded)
        if found is not None:
            path, problem, _ = found
            where = ".".join(str(p) for p in path)
            raise ValueError(f"the JSON in it{' at ' + where if where else ''}: {problem}")
        return v


class ToolCall(BaseModel):
    """One tool call of an assistant message."""

    id: Text
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    """A chat message as OpenAI clients send it (fields a client echoes back from an earlier
    reply, such as ``refusal`` or ``annotations``, are accepted and do not reach the model)."""

    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Text | None = None

    def text(self) -> str:
        """The message as plain text (text parts joined); ValueError for non-text parts."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ValueError(f"content part of type {part.type!r} is not supported; send text")
            parts.append(part.text)
        return "".join(parts)


class StreamOptions(BaseModel):
    """OpenAI's stream options."""

    include_usage: bool = False


class FunctionDefinition(BaseModel):
    """A function the model may call: name, description and a JSON schema of its arguments."""

    model_config = ConfigDict(extra="forbid")
    name: Name
    description: Text | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ToolDefinition(BaseModel):
    """An entry of ``tools``: only functions."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: Name


class NamedToolChoice(BaseModel):
    """``tool_choice`` naming one function the model must call."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["function"]
    function: NamedFunction


def _tool_choice_kind(value: Any) -> str:
    return "str" if isinstance(value, str) else "dict"


# Tagged by JSON type, so an error names the field itself (``tool_choice.function.name``), not
# a union member (the error path leaves type names out).
ToolChoice = Annotated[
    Annotated[Literal["none", "auto", "required"], Tag("str")]
    | Annotated[NamedToolChoice, Tag("dict")],
    Discriminator(_tool_choice_kind),
]


class JsonSchemaFormat(BaseModel):
    """``response_format.json_schema``: the schema a reply must validate against."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: Name
    description: Text | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """``response_format``: free text, any JSON object, or JSON under a schema."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object (name and schema)')
        return self


class NoEffectFields(BaseModel):
    """Fields that do not change a reply (bookkeeping, caching and routing hints): accepted
    and not used, on every route. Every other unknown field gets a 400 naming it."""

    model_config = ConfigDict(extra="forbid")
    user: Any = None
    metadata: Any = None
    store: Any = None
    service_tier: Any = None
    prompt_cache_key: Any = None
    safety_identifier: Any = None
    cache_prompt: Any = None  # llama.cpp's server flag; this server caches prompts anyway


_TOKEN_ID = re.compile(r"0|[1-9][0-9]{0,9}")


class SamplingFields(NoEffectFields):
    """Fields chat and text completions share: stop strings, logit bias, penalties, and the
    sampling fields vLLM and llama.cpp's server take beyond OpenAI's (``top_k``, ``min_p``,
    ``repetition_penalty``; null or the "off" value leaves them off)."""

    stop: Text | list[Text] | None = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    top_k: int | None = Field(
        None, ge=-1, le=2**31 - 1, description="Sample from the k most likely tokens; 0 or -1: off"
    )
    min_p: float | None = Field(
        None, ge=0.0, le=1.0, description="Keep tokens with p >= min_p * p(best token); 0: off"
    )
    repetition_penalty: float | None = Field(
        None,
        gt=0.0,
        le=100.0,
        description="Divide positive logits (multiply others) of the last 64 tokens' ids by "
        "it; 1: off",
    )

    def sampling_extras(self) -> dict[str, Any]:
        """The extra sampling fields set to something other than off, as ``GenerationParams``
        fields (``top_k``: int, ``min_p``, ``repetition_penalty``: float)."""
        out: dict[str, Any] = {}
        if self.top_k is not None and self.top_k > 0:
            out["top_k"] = self.top_k
        if self.min_p:
            out["min_p"] = self.min_p
        if self.repetition_penalty is not None and self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        return out

    def stop_list(self) -> list[str] | None:
        """``stop`` as a list (the validator below has made it one)."""
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def token_bias(self) -> dict[int, float]:
        """``logit_bias`` with its keys as token ids (the validator checked each is a token id
        in ASCII decimal digits). The backend checks the ids against its vocabulary."""
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str] | None:
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (v or {}).items():
            # Only the plain form of an id: str.isdigit() and int() also take other scripts'
            # digits, superscripts, signs and spaces, and int() refuses over 4300 digits.
            if _TOKEN_ID.fullmatch(key) is None:
                raise ValueError(
                    f"keys are token ids written in ASCII digits 0-9 (no sign, space or leading "
                    f"zero; at most 10 digits), not {key[:40]!r}"
                )
            if not math.isfinite(bias) or not -100.0 <= bias <= 100.0:
                raise ValueError(f"token {key}: a bias is between -100 and 100, not {bias}")
        return v


class ChatCompletionRequest(SamplingFields):
    """POST /v1/chat/completions."""

    model: Text = Field(min_length=1, description="The served model's id, or a task name")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, le=32768)
    max_completion_tokens: int | None = Field(None, ge=1, le=32768)
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="Default: the task's (0)")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=16, description="Choices; at most the server's parallel slots")
    seed: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolDefinition] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        if self.tool_choice not in (None, "none") and not self.tools:
            raise ValueError("tool_choice needs tools: send the functions the model may call")
        return self


class ChatCompletionMessage(BaseModel):
    """The assistant's reply: text, or tool calls (``content`` null)."""

    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: None = None
    tool_calls: list[ToolCall] | None = None


class TopLogprob(BaseModel):
    """One likely token at a position: text, log-probability, UTF-8 bytes."""

    token: str
    logprob: float
    bytes: list[int]


class LogprobEntry(TopLogprob):
    """A generated token's log-probability and the most likely tokens at its position."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)

    @classmethod
    def of(cls, entry) -> LogprobEntry:
        """From an engine's ``TokenLogprob``."""
        top = [TopLogprob(token=_text(b), logprob=lp, bytes=list(b)) for b, lp in entry.top]
        return cls(
            token=_text(entry.token),
            logprob=entry.logprob,
            bytes=list(entry.token),
            top_logprobs=top,
        )


def _text(piece: bytes) -> str:
    return piece.decode("utf-8", errors="replace")


class ChoiceLogprobs(BaseModel):
    """``choices[].logprobs``: one entry per generated token."""

    content: list[LogprobEntry] | None = None
    refusal: None = None

    @classmethod
    def of(cls, entries) -> ChoiceLogprobs:
        """From a list of ``TokenLogprob``."""
        return cls(content=[LogprobEntry.of(e) for e in entries])


class Choice(BaseModel):
    """One choice of a chat completion."""

    index: int = 0
    message: ChatCompletionMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None = None


class PromptTokensDetails(BaseModel):
    """OpenAI's breakdown of the prompt tokens."""

    cached_tokens: int = 0


class UsageInfo(BaseModel):
    """Token counts; ``prompt_tokens_details.cached_tokens`` are prompt tokens that were not
    evaluated again (a cached task prefix, or the conversation's earlier turns)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, usage) -> UsageInfo:
        """From an engine's ``Usage``."""
        return cls(
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            total_tokens=usage.prompt_tokens + usage.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_tokens),
        )


def completion_id() -> str:
    """A fresh chat-completion id."""
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


class ChatCompletionResponse(BaseModel):
    """A non-streamed chat completion."""

    id: str = Field(default_factory=completion_id)
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[Choice]
    usage: UsageInfo


class DeltaFunction(BaseModel):
    """Part of a streamed tool call's function: the name comes once, arguments in pieces."""

    name: str | None = None
    arguments: str | None = None


class DeltaToolCall(BaseModel):
    """A streamed tool call piece; ``index`` says which call it belongs to."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: DeltaFunction | None = None


class DeltaMessage(BaseModel):
    """What one stream chunk adds to the reply."""

    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[DeltaToolCall] | None = None


class ChunkChoice(BaseModel):
    """One choice of a stream chunk."""

    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    """One ``data:`` event of a streamed chat completion (OpenAI's shape)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: UsageInfo | None = None


class ChunkStream:
    """Builds the chunks of one streamed reply: same id, creation time and model throughout."""

    def __init__(self, model: str) -> None:
        self.id, self.created, self.model = completion_id(), int(time.time()), model

    def sse(self, chunk: ChatCompletionChunk) -> str:
        """One SSE event. Fields never set are left out (a delta without ``role``, a chunk
        without ``usage``); ``finish_reason`` is always there, null until the end, as OpenAI's."""
        return sse(chunk.model_dump_json(exclude_unset=True))

    def delta(
        self,
        content: str,
        role: bool = False,
        logprobs: ChoiceLogprobs | None = None,
        index: int = 0,
    ) -> str:
        """A chunk that adds ``content`` (and opens the assistant's message with ``role``),
        with the log-probabilities of its tokens when the request asked for them."""
        d = (
            DeltaMessage(role="assistant", content=content)
            if role
            else DeltaMessage(content=content)
        )
        choice = ChunkChoice(index=index, delta=d, finish_reason=None)
        if logprobs is not None:
            choice.logprobs = logprobs
        return self.sse(self._chunk([choice]))

    def tool_call(self, index: int, call: ToolCall, choice: int = 0) -> str:
        """A chunk with one whole tool call (OpenAI's indexed delta: id, name, arguments)."""
        fn = DeltaFunction(name=call.function.name, arguments=call.function.arguments)
        d = DeltaMessage(
            tool_calls=[DeltaToolCall(index=index, id=call.id, type="function", function=fn)]
        )
        return self.sse(self._chunk([ChunkChoice(index=choice, delta=d, finish_reason=None)]))

    def finish(self, reason: str, index: int = 0) -> str:
        """The chunk that ends a choice with its finish reason."""
        choice = ChunkChoice(index=index, delta=DeltaMessage(), finish_reason=reason)
        return self.sse(self._chunk([choice]))

    def usage(self, usage: UsageInfo) -> str:
        """The usage chunk (``stream_options.include_usage``): no choices."""
        return self.sse(self._chunk([], usage))

    def _chunk(self, choices: list[ChunkChoice], usage: UsageInfo | None = None):
        fields = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
        fields |= {"model": self.model, "choices": choices}
        if usage is not None:
            fields["usage"] = usage
        return ChatCompletionChunk(**fields)


class ModelCard(BaseModel):
    """An entry of GET /v1/models: the loaded model or one task."""

    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "allinone"
    kind: str = "model"
    description: str = ""
    labels: list[str] | None = None


class ModelMetadata(BaseModel):
    """A model as TypeSafe's ``GET /v1/models`` lists it."""

    name: str
    description: str
    release_date: str = Field(description="YYYY-MM-DD")


class ModelList(BaseModel):
    """GET /v1/models: OpenAI's ``data`` and TypeSafe's ``models`` in one body, which both SDKs
    parse (each reads its own key)."""

    object: Literal["list"] = "list"
    data: list[ModelCard]
    models: list[ModelMetadata] = Field(default_factory=list)


class ClassifyRequest(NoEffectFields):
    """POST /v1/classify: one text or a list of texts for a classify task."""

    task: Text = Field("sentiment", min_length=1, description="A classify task's name")
    input: Text | list[Text] = Field(description="Text, or a list of texts classified in order")


class ClassifyItem(BaseModel):
    """One classified text; ``flagged`` is set for screening tasks (label != their safe one)."""

    index: int
    label: str
    scores: dict[str, float]
    flagged: bool | None = None
    category: str | None = None


class ClassifyUsage(BaseModel):
    """Tokens evaluated for a classify request (cached prefix tokens counted apart)."""

    prompt_tokens: int
    cached_tokens: int


class ClassifyResponse(BaseModel):
    """Labels and per-label probabilities, in input order."""

    object: Literal["classification"] = "classification"
    task: str
    model: str
    results: list[ClassifyItem]
    usage: ClassifyUsage
    latency_ms: float


class ExtractRequest(NoEffectFields):
    """POST /v1/extract: one text for an extract task."""

    task: Text = Field("summarize", min_length=1, description="An extract task's name")
    input: Text = Field(description="The text (e.g. a transcript) to extract from")


class ExtractResponse(BaseModel):
    """The task's JSON answer (always valid JSON, keys = the task's fields)."""

    object: Literal["extraction"] = "extraction"
    task: str
    model: str
    output: dict[str, str]
    scores: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Per label field, every label's probability (the output is the top one)",
    )
    usage: UsageInfo
    latency_ms: float
