"""TaskSpec: what one task asks of the model, validated from its TOML file."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from allinone.serving.errors import InputError


class Example(BaseModel):
    """A few-shot example: an input and the answer the model should give."""

    model_config = ConfigDict(extra="forbid")
    input: str = Field(min_length=1)
    output: str = Field(min_length=1)


class InputLimits(BaseModel):
    """How much input a task accepts and what happens to more."""

    model_config = ConfigDict(extra="forbid")
    max_chars: int = Field(2000, ge=1, le=1_000_000, description="Longest input in characters")
    overflow: Literal["truncate", "reject"] = Field(
        "truncate", description="Over the limit: keep the first max_chars, or answer 400"
    )


class OutputLimits(BaseModel):
    """How long a generated reply may get."""

    model_config = ConfigDict(extra="forbid")
    max_tokens: int = Field(256, ge=1, le=32768, description="Most tokens generated per reply")
    max_chars: int | None = Field(
        None, ge=1, description="Most characters in a reply; the reply is cut there"
    )
    json_schema: dict[str, Any] | None = Field(
        None,
        description="Chat tasks: every reply is JSON valid under this schema (structured "
        "output, enforced token by token); {} for any JSON object. A client's own "
        "response_format replaces it for that request. In TOML, a table or a JSON string",
    )

    @field_validator("json_schema", mode="before")
    @classmethod
    def _schema_text(cls, v: Any) -> Any:
        if isinstance(v, str):
            try:
                return json.loads(v)
            except ValueError as exc:
                raise ValueError(f"json_schema is not valid JSON: {exc}") from None
        return v


class OutputField(BaseModel):
    """One key of an extract task's JSON answer: free text (generated, capped) or a label
    (scored, so always one of ``labels``)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
    type: Literal["text", "label"]
    labels: list[str] = Field(default_factory=list)
    max_chars: int = Field(200, ge=1, le=10000, description="Text fields: longest value")
    max_tokens: int = Field(128, ge=1, le=4096, description="Text fields: most tokens generated")

    @model_validator(mode="after")
    def _check(self) -> OutputField:
        if self.type == "label" and len(set(self.labels)) < 2:
            raise ValueError(f"label field {self.name!r} needs at least two distinct labels")
        if self.type == "text" and self.labels:
            raise ValueError(f"text field {self.name!r} takes no labels")
        return self


class TaskQuestion(BaseModel):
    """One question of a decide task (answered with the others in one engine request)."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)
    type: Literal["predicate", "choice", "score"]
    instructions: str = Field(min_length=1, description="The question (predicate: a statement)")
    choices: list[str] = Field(default_factory=list, description="Choice: the options, in order")
    levels: list[str] = Field(default_factory=list, description="Score: the levels, lowest first")
    calibration: str | None = Field(
        None, description="A classify task whose stored calibration applies (same labels)"
    )

    @model_validator(mode="after")
    def _check(self) -> TaskQuestion:
        if self.type == "choice" and (
            len(self.choices) < 2 or len(set(self.choices)) != len(self.choices)
        ):
            raise ValueError(f"choice question {self.name!r} needs 2 or more distinct choices")
        if self.type == "score" and not 2 <= len(self.levels) <= 10:
            raise ValueError(f"score question {self.name!r} needs 2 to 10 levels")
        if (self.type != "choice" and self.choices) or (self.type != "score" and self.levels):
            raise ValueError(
                f"question {self.name!r}: choices are for choice questions, "
                "levels for score questions"
            )
        return self


class TaskSpec(BaseModel):
    """One task: a system prompt plus either labels to choose from or a chat/generation setup."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    kind: Literal["classify", "chat", "extract", "decide"]
    description: str = ""
    system: str = Field(
        "", description="System prompt; the cached task prefix (decide tasks use their own)"
    )
    labels: list[str] = Field(default_factory=list)
    label_values: dict[str, str] = Field(
        default_factory=dict, description="Dataset value -> label, e.g. {'1': '正面', '0': '负面'}"
    )
    examples: list[Example] = Field(default_factory=list)
    input: InputLimits = Field(default_factory=InputLimits)
    output: OutputLimits = Field(default_factory=OutputLimits)
    history_tokens: int = Field(
        1024, ge=16, le=32768, description="Chat: token budget for past turns; oldest dropped first"
    )
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="Default sampling temperature")
    fields: list[OutputField] = Field(
        default_factory=list, description="Extract: the keys of the JSON answer, in order"
    )
    flag_unless: str | None = Field(
        None, description="Classify: answers other than this label are reported as flagged"
    )
    category_task: str | None = Field(
        None, description="Classify: a classify task that names the category of flagged texts"
    )
    questions: list[TaskQuestion] = Field(
        default_factory=list, description="Decide: the questions answered about each input"
    )

    @model_validator(mode="after")
    def _check_kind(self) -> TaskSpec:
        if self.kind != "decide" and not self.system.strip():
            raise ValueError(f"a {self.kind} task needs a system prompt (system = ...)")
        if self.kind == "decide":
            if not self.questions:
                raise ValueError("a decide task needs at least one [[questions]] entry")
            if len({q.name for q in self.questions}) != len(self.questions):
                raise ValueError("question names must be distinct")
        elif self.questions:
            raise ValueError(f"a {self.kind} task has no questions")
        if self.kind == "classify":
            if len(self.labels) < 2:
                raise ValueError("a classify task needs at least two labels")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError("labels must be distinct")
            if any(not lab.strip() for lab in self.labels):
                raise ValueError("labels must be non-empty")
            unknown = set(self.label_values.values()) - set(self.labels)
            if unknown:
                raise ValueError(f"label_values map to unknown labels: {sorted(unknown)}")
            bad = [ex.output for ex in self.examples if ex.output not in self.labels]
            if bad:
                raise ValueError(f"example outputs must be labels; got {bad}")
            if self.flag_unless is not None and self.flag_unless not in self.labels:
                raise ValueError(f"flag_unless {self.flag_unless!r} is not one of the labels")
            if self.category_task is not None and self.flag_unless is None:
                raise ValueError("category_task needs flag_unless (which label is not flagged)")
        elif self.labels:
            raise ValueError(f"a {self.kind} task has no labels")
        if self.kind == "extract" and not self.fields:
            raise ValueError("an extract task needs at least one [[fields]] entry")
        if self.kind != "extract" and self.fields:
            raise ValueError(f"a {self.kind} task has no fields")
        if len({f.name for f in self.fields}) != len(self.fields):
            raise ValueError("field names must be distinct")
        if self.output.json_schema is not None:
            if self.kind != "chat":
                raise ValueError("output.json_schema applies to chat tasks only")
            if self.output.max_chars is not None:
                raise ValueError("output.max_chars would cut a JSON reply; bound max_tokens")
        return self

    def prepare_input(self, text: str) -> str:
        """Apply the input limit: truncate or raise InputError, per the task's overflow mode."""
        if not text.strip():
            raise InputError("input is empty: send some text to classify")
        if len(text) > self.input.max_chars:
            if self.input.overflow == "reject":
                raise InputError(
                    f"input has {len(text)} characters; task {self.name!r} accepts at most "
                    f"{self.input.max_chars}. Shorten it."
                )
            text = text[: self.input.max_chars]
        return text

    def label_for_value(self, value: str) -> str:
        """Map a dataset value (e.g. '1') or a label itself to this task's label."""
        if value in self.labels:
            return value
        if value in self.label_values:
            return self.label_values[value]
        raise InputError(f"value {value!r} is neither a label of {self.name!r} nor in label_values")
