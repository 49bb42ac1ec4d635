"""Wire models of the legacy completions route (OpenAI's ``POST /v1/completions``) and the
tokenizer routes (llama.cpp's and vLLM's ``POST /tokenize`` and ``POST /detokenize``)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, StrictInt, model_validator

from allinone.api.protocol import NoEffectFields, SamplingFields, StreamOptions, Text


class CompletionRequest(SamplingFields):
    """POST /v1/completions (OpenAI's legacy API); one prompt, one choice."""

    model: Text = Field(min_length=1, description="The served model's id")
    prompt: Text | list[Text] = Field(description="The text to continue (a list of one)")
    max_tokens: int = Field(16, ge=1, le=32768)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=1, description="One choice per request")
    best_of: int = Field(1, ge=1, le=1, description="One candidate per request")
    echo: Literal[False] = Field(False, description="Echoing the prompt is not supported")
    logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise ValueError("send one prompt (a string, or a list of exactly one)")
        return self


class TokenizeRequest(NoEffectFields):
    """POST /tokenize: llama.cpp's ``content`` or vLLM's ``prompt``."""

    model: str | None = None
    content: Text | None = None
    prompt: Text | None = None
    add_special: bool = Field(False, description="Parse control-token markup in the text")
    with_pieces: bool = Field(
        False, description="Also return each token's text (control tokens as their markup)"
    )

    @model_validator(mode="after")
    def _one_text(self) -> TokenizeRequest:
        if (self.content is None) == (self.prompt is None):
            raise ValueError("send the text as content (or prompt), one of them")
        return self


class DetokenizeRequest(NoEffectFields):
    """POST /detokenize: token ids -> text, control tokens as their markup (``<|im_start|>``);
    400 naming ``tokens`` for an id outside the vocabulary."""

    model: str | None = None
    # Strict: true or "5" is not a token id (lax ints would take them as 1 and 5).
    tokens: list[StrictInt] = Field(max_length=1_000_000)


class Detokenized(BaseModel):
    """The text of token ids, under both servers' names."""

    content: str
    prompt: str
