"""Wire models of OpenAI's ``POST /v1/decisions`` and TypeSafe's ``POST /v1/systemone``.

Shapes from openai 3.51.0's ``types/decision*`` and typesafe-sdk 0.7.5's
``_schemas/models.py``. Every model forbids unknown fields: a field we do not honour is
refused by name, never ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictBool,
    StrictStr,
    Tag,
    field_validator,
)

from allinone.api.protocol import Name, Text


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- OpenAI /v1/decisions ----------------------------------------------------------------------
class InputTextPart(_Strict):
    type: Literal["input_text"]
    text: Text
    prompt_cache_breakpoint: dict[str, Any] | None = None


class InputImagePart(_Strict):
    type: Literal["input_image"]
    image_url: str | None = None
    detail: str | None = None
    file_id: str | None = None
    prompt_cache_breakpoint: dict[str, Any] | None = None


class InputJsonPart(_Strict):
    type: Literal["input_json"]
    data: dict[str, Any] | list[dict[str, Any]]


class OutputTextPart(_Strict):
    type: Literal["output_text"]
    text: Text
    annotations: list[Any] | None = None


class RefusalPart(_Strict):
    type: Literal["refusal"]
    refusal: Text


ContentPart = Annotated[
    InputTextPart | InputImagePart | InputJsonPart | OutputTextPart | RefusalPart,
    Field(discriminator="type"),
]


class InputMessage(_Strict):
    type: Literal["message"] | None = None
    role: Literal["user", "system", "developer", "assistant"]
    content: Text | list[ContentPart]
    phase: Literal["commentary", "final_answer"] | None = None
    id: str | None = None
    status: str | None = None


class FunctionCallItem(_Strict):
    type: Literal["function_call"]
    call_id: str
    name: Name
    arguments: str
    id: str | None = None
    namespace: str | None = None
    status: str | None = None


class FunctionCallOutputItem(_Strict):
    type: Literal["function_call_output"]
    call_id: str
    output: Text | list[ContentPart]
    id: str | None = None
    status: str | None = None


class CustomToolCallItem(_Strict):
    type: Literal["custom_tool_call"]
    call_id: str
    name: Name
    input: str
    id: str | None = None
    namespace: str | None = None


class CustomToolCallOutputItem(_Strict):
    type: Literal["custom_tool_call_output"]
    call_id: str
    output: Text | list[ContentPart]
    id: str | None = None


def _item_kind(v: Any) -> str:
    if isinstance(v, dict):
        return str(v.get("type") or "message")
    return str(getattr(v, "type", None) or "message")


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[CustomToolCallItem, Tag("custom_tool_call")]
    | Annotated[CustomToolCallOutputItem, Tag("custom_tool_call_output")],
    Discriminator(_item_kind),
]

InstructionPart = Annotated[
    InputTextPart | InputImagePart | InputJsonPart, Field(discriminator="type")
]
Instructions = Text | list[InstructionPart]


class _QuestionBase(_Strict):
    instructions: Instructions
    name: StrictStr | None = None
    x_calibration: str | None = Field(
        None,
        description="allinone extension: a classify task whose stored calibration applies "
        "(the question's options must be that task's labels, in order)",
    )

    @field_validator("name", mode="before")
    @classmethod
    def _name_not_null(cls, v: Any) -> Any:
        # Runs only when the field is sent: omit it for an unnamed question.
        if v is None:
            raise ValueError("name must be a string when present; omit it for no name")
        return v


class PredicateQuestion(_QuestionBase):
    type: Literal["predicate"]


class ChoiceOption(_Strict):
    value: StrictStr | StrictBool
    description: Text | None = None


class ChoiceQuestion(_QuestionBase):
    type: Literal["choice"]
    choices: list[ChoiceOption]


class ScoreLevel(_Strict):
    label: Text
    description: Text | None = None


class ScoreQuestion(_QuestionBase):
    type: Literal["score"]
    levels: list[ScoreLevel]


DecisionQuestion = Annotated[
    PredicateQuestion | ChoiceQuestion | ScoreQuestion, Field(discriminator="type")
]


class PromptCacheOptions(_Strict):
    mode: Literal["implicit", "explicit"] | None = None
    ttl: Literal["30m"] | None = None


class DecisionRequest(_Strict):
    """``POST /v1/decisions``. ``prompt_cache_key``/``prompt_cache_options`` and
    ``safety_identifier`` are accepted: they do not change an answer (our prefix cache is keyed
    by the tokens themselves)."""

    model: str
    input: Text | list[InputItem]
    questions: list[DecisionQuestion]
    prompt_cache_key: str | None = None
    prompt_cache_options: PromptCacheOptions | None = None
    safety_identifier: str | None = Field(None, max_length=128)
    x_strategy: str | None = Field(
        None,
        description="How the answers are read (vendor field): a reading, codes or cloze, then "
        "optional +permuted, +contrast and +prior, e.g. cloze+contrast+prior (the default). "
        "Unknown parts: 400 (422 on systemone).",
    )


class PredicateAnswer(BaseModel):
    type: Literal["predicate"] = "predicate"
    name: str | None
    probability: float
    x_label_mass: float
    x_strategy: str


class ChoiceProbability(BaseModel):
    value: str | bool
    probability: float


class ChoiceAnswer(BaseModel):
    type: Literal["choice"] = "choice"
    name: str | None
    choice: str | bool
    confidence: float
    probabilities: list[ChoiceProbability]
    x_label_mass: float
    x_strategy: str


class ScoreProbability(BaseModel):
    value: int
    label: str
    probability: float


class ScoreAnswer(BaseModel):
    type: Literal["score"] = "score"
    name: str | None
    score: float
    confidence: float
    probabilities: list[ScoreProbability]
    x_label_mass: float
    x_strategy: str


class InputTokensDetails(BaseModel):
    cached_tokens: int
    cache_write_tokens: int = 0


class OutputTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class DecisionUsage(BaseModel):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int = 0
    output_tokens_details: OutputTokensDetails = Field(default_factory=OutputTokensDetails)
    total_tokens: int


class DecisionResponse(BaseModel):
    answers: list[PredicateAnswer | ChoiceAnswer | ScoreAnswer]
    model: str
    usage: DecisionUsage


# -- TypeSafe /v1/systemone ----------------------------------------------------------------------
TSText = Text | dict[str, Any] | list[Any]


class NoulCriteria(_Strict):
    true: TSText | None = None
    false: TSText | None = None


class NoulQuestion(_Strict):
    type: Literal["noul"]
    instructions: TSText | None = None
    criteria: NoulCriteria | None = None


class SOChoiceQuestion(_Strict):
    type: Literal["choice"]
    instructions: TSText | None = None
    criteria: dict[str, TSText | None] = Field(min_length=1)


class SOScoreQuestion(_Strict):
    type: Literal["score"]
    instructions: TSText | None = None
    criteria: list[TSText] = Field(min_length=2)


class BoxQuestion(_Strict):
    type: Literal["box"]
    instructions: TSText | None = None


SystemOneQuestion = Annotated[
    NoulQuestion | SOChoiceQuestion | SOScoreQuestion | BoxQuestion,
    Field(discriminator="type"),
]


class SystemOneRequest(_Strict):
    """``POST /v1/systemone``: ``state`` and questions keyed by id."""

    model: str = "jev-latest"
    state: Text | dict[str, Any] | list[Any]
    questions: dict[str, SystemOneQuestion] = Field(min_length=1)
    assets: dict[str, Any] | None = None
    x_strategy: str | None = Field(
        None,
        description="How the answers are read (vendor field): a reading, codes or cloze, then "
        "optional +permuted, +contrast and +prior, e.g. cloze+contrast+prior (the default). "
        "Unknown parts: 400 (422 on systemone).",
    )


class SONoulAnswer(BaseModel):
    type: Literal["noul"] = "noul"
    noul: float
    x_label_mass: float
    x_strategy: str


class SOChoiceAnswer(BaseModel):
    type: Literal["choice"] = "choice"
    choice: str
    probabilities: dict[str, float]
    confidence: float
    x_label_mass: float
    x_strategy: str


class SOScoreAnswer(BaseModel):
    type: Literal["score"] = "score"
    score: float
    legend: dict[str, Any]
    probabilities: dict[str, float]
    confidence: float
    x_label_mass: float
    x_strategy: str


class SystemOneUsage(BaseModel):
    input_tokens: int
    output_tokens: int = 0


class SystemOneResponse(BaseModel):
    model: str
    answers: dict[str, SONoulAnswer | SOChoiceAnswer | SOScoreAnswer]
    usage: SystemOneUsage


# -- allinone's own /v1/decide (decide tasks) ------------------------------------------------------
class TaskDecisionRequest(_Strict):
    """``POST /v1/decide``: a decide task's questions about one input."""

    task: Text = Field(min_length=1, description="A decide task's name")
    input: Text


class TaskDecisionResponse(BaseModel):
    """Answers keyed by question name, each in OpenAI's answer shape."""

    task: str
    model: str
    answers: dict[str, PredicateAnswer | ChoiceAnswer | ScoreAnswer]
    usage: Any
    latency_ms: float
