"""The backend interface: what the task layer and the API need from any engine.

A backend is cheap to construct; ``load()`` does the heavy work. Work is submitted as a request
and answered through a ``RequestHandle``: a thread-safe channel that sync code (the CLI) reads by
iterating and async code (the server) reads with ``async for`` or ``await handle.result_async()``,
so no caller ever blocks the engine or the event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from allinone.serving.errors import InputError


class BackendError(RuntimeError):
    """The engine failed to run a request (not the caller's fault)."""


class EngineDeadError(BackendError):
    """The engine loop has stopped: nothing can run until the process is restarted."""


class EngineOverloadedError(BackendError):
    """The wait queue is full: the caller should retry later."""


class UpstreamError(BackendError):
    """A remote engine failed or answered something unusable (HTTP 502)."""


class UpstreamTimeoutError(UpstreamError):
    """A remote engine did not answer in time (HTTP 504)."""


class PromptTooLongError(InputError):
    """A prompt does not fit the context a sequence may use (400
    ``context_length_exceeded``; ``param``: the API family's input field)."""

    code = "context_length_exceeded"


class GrammarError(InputError):
    """A grammar or JSON schema the engine cannot compile or follow (the caller's to fix)."""

    def __init__(self, message: str, param: str | None = "response_format") -> None:
        super().__init__(message, param)


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; ``special`` pieces are template markup whose control tokens are
    parsed, user content never is (so a user cannot inject ``<|im_end|>``)."""

    text: str
    special: bool = False


@dataclass(frozen=True)
class Prompt:
    """A prompt split into a cacheable prefix (shared by every request of a task) and a body."""

    prefix: tuple[Segment, ...]
    body: tuple[Segment, ...]


@dataclass(frozen=True)
class ScoreBranch:
    """One question of a branch-scoring request: text that follows the shared body (template
    markup included, ``special`` as in ``Segment``) and the labels read after it."""

    suffix: tuple[Segment, ...]
    labels: tuple[str, ...]
    # each label is read as the whole reply: followed by the end-of-turn token (so a label
    # that begins another does not take the longer one's probability); needs
    # "answer_scoring" in ``Backend.capabilities``
    end_turn: bool = False


@dataclass
class GenerationParams:
    """Per-request sampling and stopping."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    # llama.cpp's truncation samplers (vLLM takes the same fields): ``top_k`` <= 0 is off,
    # ``min_p`` 0 is off (keep tokens with p >= min_p * p_max).
    top_k: int = 0
    min_p: float = 0.0
    # llama.cpp's ``penalty_repeat`` (1.0: off), over the last 64 tokens of prompt and reply.
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    max_chars: int | None = None
    seed: int | None = None
    # OpenAI's logit processing, applied in this order before temperature: ``logit_bias``
    # (token id -> added logit, -100..100), presence and frequency penalties over the tokens
    # generated so far, then the grammar's mask.
    logit_bias: dict[int, float] = field(default_factory=dict)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    grammar: Any = None  # a compiled grammar (llama.cpp backend: ``TokenGrammar``)
    # Report each generated token's log-probability and the ``top_logprobs`` most likely ones.
    logprobs: bool = False
    top_logprobs: int = 0


FinishReason = Literal["stop", "length", "cancelled"]
"""Why a request ended (OpenAI's ``finish_reason`` values, plus ``cancelled``)."""


@dataclass
class Usage:
    """Token counts of one finished request."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token with its log-probability (natural log, under the model's own
    distribution before logit bias, penalties, grammar and temperature) and, when asked for,
    the most likely tokens at that position as (token bytes, log-probability), best first.

    The entries of a reply spell exactly its returned text: a token that a stop string or a
    character cap cuts keeps only its ``token`` bytes before the cut (its log-probability is
    the whole token's), and tokens wholly past the cut are left out."""

    token: bytes
    logprob: float
    top: tuple[tuple[bytes, float], ...] = ()


@dataclass
class Finished:
    """Final event of a request: why it stopped, its usage, and its result (scoring: one
    log-probability per choice; generation: the whole reply text). ``logprobs``: when the
    request asked for them, one entry per token of the returned text (``TokenLogprob``), so
    fewer than ``usage.completion_tokens`` when a stop string or a cap cut the reply."""

    reason: FinishReason
    usage: Usage
    result: Any = None
    logprobs: list[TokenLogprob] | None = None
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did


class RequestHandle:
    """Channel from the engine thread to one caller: text deltas, then one Finished or an error."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        # Each wake-up runs the event loop's thread, which on a machine with as many cores as
        # llama.cpp has threads preempts one of them mid-step.
        self._wake_on_text = True
        try:
            self._loop = asyncio.get_running_loop()
            self._wakeup = asyncio.Event()
        except RuntimeError:
            pass

    # -- engine side -------------------------------------------------------------------------
    def _put(self, kind: str, value: Any) -> None:
        self._q.put((kind, value))
        if kind in ("text", "logprobs") and not self._wake_on_text:
            return  # the caller awaits only the end (``result_async``): no wake-up per token
        if self._loop is not None and self._wakeup is not None:
            try:
                self._loop.call_soon_threadsafe(self._wakeup.set)
            except RuntimeError:  # the caller's loop is gone; nobody is listening
                self.cancelled.set()

    def emit_text(self, text: str) -> None:
        """Engine: a new piece of generated text."""
        self._put("text", text)

    def emit_logprobs(self, entries: list[TokenLogprob]) -> None:
        """Engine: log-probabilities of the tokens whose text comes next (only for requests
        that asked for them; the event is ("logprobs", list[TokenLogprob]))."""
        self._put("logprobs", entries)

    def finish(self, finished: Finished) -> None:
        """Engine: the request is done."""
        self._put("done", finished)

    def fail(self, exc: BaseException) -> None:
        """Engine: the request failed."""
        self._put("error", exc)

    # -- caller side -------------------------------------------------------------------------
    def cancel(self) -> None:
        """Caller: stop this request; the engine frees its sequence at the next step."""
        self.cancelled.set()

    def events(self, timeout: float | None = None) -> Iterator[tuple[str, Any]]:
        """Blocking iteration over ("text", str) and a final ("done", Finished)."""
        while True:
            kind, value = self._q.get(timeout=timeout)
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    async def aevents(self) -> AsyncIterator[tuple[str, Any]]:
        """Async iteration over the same events, for handles created inside an event loop."""
        if self._wakeup is None:
            raise RuntimeError("handle was not created inside a running event loop")
        while True:
            try:
                kind, value = self._q.get_nowait()
            except queue.Empty:
                self._wakeup.clear()
                if self._q.empty():
                    await self._wakeup.wait()
                continue
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def result(self, timeout: float | None = None) -> Finished:
        """Block until the request finishes (text events are skipped)."""
        for kind, value in self.events(timeout):
            if kind == "done":
                return value
        raise BackendError("request ended without a result")  # pragma: no cover

    async def result_async(self) -> Finished:
        """Await the request's Finished event."""
        self._wake_on_text = False
        try:
            async for kind, value in self.aevents():
                if kind == "done":
                    return value
        finally:
            self._wake_on_text = True
        raise BackendError("request ended without a result")  # pragma: no cover


class Backend(ABC):
    """An engine that runs one loaded model for many concurrent requests."""

    name: ClassVar[str] = "base"
    # What this engine can do beyond generating and scoring choices, the one capability
    # mechanism: GenerationParams' optional features "grammar", "logit_bias", "penalties",
    # "logprobs", "top_k", "min_p", "repetition_penalty" (a request that needs another gets a
    # 400 naming its field), and "answer_scoring": score_branches returns full-vocabulary
    # log-probabilities of whole answers (labels of several tokens, ``ScoreBranch.end_turn``),
    # comparable across branches, which the cloze reading of decisions needs.
    capabilities: ClassVar[frozenset[str]] = frozenset()

    @abstractmethod
    def load(self) -> None:
        """Load the model and start serving; blocks until ready or raises."""

    @abstractmethod
    def health(self) -> bool:
        """True while the backend can serve requests."""

    @property
    @abstractmethod
    def model_id(self) -> str:
        """The id the API reports for the loaded model."""

    @property
    @abstractmethod
    def context_tokens(self) -> int:
        """Tokens one request may use (prompt + reply)."""

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes (used to bound chat history)."""

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        n_prefix_messages: int,
        tools: list[dict] | None = None,
    ) -> Prompt:
        """Render messages with the model's chat template, ready for an assistant reply.

        The first ``n_prefix_messages`` messages (e.g. the system prompt and few-shot turns) form
        the cacheable prefix. ``tools``: OpenAI-style function definitions, which the template
        renders in its own tool-use format; messages may then carry ``tool_calls`` (arguments
        as objects) and come with role ``tool``."""
        template = getattr(self, "_template", None)
        if template is None:
            raise BackendError("the model is not loaded")
        return template.render(messages, n_prefix_messages, tools)

    def failure(self) -> str | None:
        """Why the engine stopped serving, once it has (None while it runs)."""
        return None

    def json_grammar(self, schema: dict[str, Any] | None) -> Any:
        """A compiled grammar for JSON valid under ``schema`` (None: any JSON object), for
        ``GenerationParams.grammar``. GrammarError when it cannot be compiled or the engine
        cannot constrain decoding."""
        raise GrammarError(f"the {self.name} backend cannot constrain its output to a schema")

    def lark_grammar(self, source: str) -> Any:
        """A compiled grammar from Lark source (llguidance's dialect); GrammarError as above."""
        raise GrammarError(f"the {self.name} backend cannot constrain its output to a grammar")

    def generate_n(self, prompt: Prompt, params: GenerationParams, n: int) -> list[RequestHandle]:
        """``n`` replies to one prompt (OpenAI's ``n``), one handle each. With a seed, choice
        ``i`` samples with ``seed + i``. This default submits ``n`` requests; the llama.cpp
        engine evaluates the prompt once and gives each choice a copy of its cells."""
        handles: list[RequestHandle] = []
        try:
            for i in range(n):
                seed = None if params.seed is None else params.seed + i
                handles.append(self.generate(prompt, dataclasses.replace(params, seed=seed)))
        except BaseException:
            for h in handles:
                h.cancel()
            raise
        return handles

    def chat_template_source(self) -> str | None:
        """The Jinja source of the chat template in use (None before load)."""
        template = getattr(self, "_template", None)
        return getattr(template, "source", None)

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        """Token ids of ``text`` (``special``: parse control-token markup)."""
        raise InputError(f"the {self.name} backend does not expose its tokenizer")

    def detokenize(self, tokens: list[int]) -> str:
        """The text of token ids (InputError for an id outside the vocabulary)."""
        raise InputError(f"the {self.name} backend does not expose its tokenizer")

    @abstractmethod
    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        """Submit a scoring request; its Finished.result is one log-probability per choice (the
        sum over the choice's tokens of log p(token | prompt, earlier tokens))."""

    def score_branches(self, prompt: Prompt, branches: list[ScoreBranch]) -> RequestHandle:
        """Submit one request that evaluates ``prompt`` and then each branch's suffix after it;
        its Finished.result holds, per branch, one log-probability per label (as in
        ``score_choices``), and its usage counts the prompt once plus every suffix.

        This default runs one ``score_choices`` request per branch (the prompt is evaluated
        again for each, unless the engine caches it); the llama.cpp engine evaluates the
        prompt once and the branches on copies of its KV cells, in shared steps.
        Raises ValueError for a branch the engine cannot score."""
        subs: list[RequestHandle] = []
        try:
            for b in branches:
                body = (*prompt.body, *b.suffix)
                subs.append(self.score_choices(Prompt(prompt.prefix, body), list(b.labels)))
        except BaseException:
            for h in subs:
                h.cancel()
            raise
        handle = RequestHandle()

        def join() -> None:
            try:
                done = []
                for h in subs:
                    if handle.cancelled.is_set():
                        break
                    done.append(h.result())
                if len(done) < len(subs):
                    for h in subs:
                        h.cancel()
                    handle.finish(Finished("cancelled", Usage()))
                    return
                usage = Usage(
                    prompt_tokens=sum(f.usage.prompt_tokens for f in done),
                    cached_tokens=sum(f.usage.cached_tokens for f in done),
                )
                handle.finish(Finished("stop", usage, [f.result for f in done]))
            except Exception as exc:
                handle.fail(exc)

        threading.Thread(target=join, name="allinone-branches", daemon=True).start()
        return handle

    @abstractmethod
    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        """Submit a generation request; its handle streams text deltas, then Finished."""

    def stats(self) -> dict[str, Any]:
        """Engine counters for metrics and health (queue depth, active sequences, ...)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Stop the engine and free the model."""
