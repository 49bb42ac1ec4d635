"""The `openai` backend: tasks and the API run here, the model runs in an OpenAI-compatible server
(vLLM, llama.cpp's server, llama-cpp-python's server, Ollama, TGI).

Prompts are rendered here with the model's chat template (ChatML unless one is given) and sent to
the upstream's ``/v1/completions``, so task prefixes, assistant continuations and label scoring
work the same as with the in-process engine. Classification asks the upstream to choose a label
under a constraint (vLLM ``structured_outputs``/``guided_choice``, llama.cpp ``grammar``) and reads
label probabilities from the first token's top log-probabilities when the upstream returns them;
an answer that is not a label is an error, never a guess.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, ClassVar

import httpx

from allinone.backends.base import (
    Backend,
    BackendError,
    EngineOverloadedError,
    Finished,
    FinishReason,
    GenerationParams,
    Prompt,
    PromptTooLongError,
    RequestHandle,
    UpstreamError,
    UpstreamTimeoutError,
    Usage,
)
from allinone.backends.chat_template import ChatTemplate
from allinone.settings import EngineSettings, ModelSettings

log = logging.getLogger(__name__)
TOP_LOGPROBS = 10


def choice_grammar(choices: list[str]) -> str:
    """A GBNF grammar that accepts exactly one of ``choices``."""
    alts = " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)
    return f"root ::= {alts}"


def label_logprobs(choices: list[str], chosen: str, top: dict[str, float] | None) -> list[float]:
    """One log-probability per choice from the first token's top alternatives.

    A choice gets the best top token that starts it; the chosen label always has a score. When
    two labels start with the same token (or no alternatives came back), probabilities cannot
    be told apart from one token, so the upstream's choice gets all the mass.
    """
    if top:
        scores: list[float | None] = []
        used: set[str] = set()
        for c in choices:
            best = max(
                ((tok, lp) for tok, lp in top.items() if tok.strip() and c.startswith(tok.strip())),
                key=lambda kv: (len(kv[0].strip()), kv[1]),
                default=None,
            )
            if best is None or best[0] in used:
                break
            used.add(best[0])
            scores.append(best[1])
        else:
            return [s if s is not None else -math.inf for s in scores]
    return [0.0 if c == chosen else -math.inf for c in choices]


class OpenAIRemoteBackend(Backend):
    """A model served by another OpenAI-compatible server, behind this project's tasks and API."""

    name: ClassVar[str] = "openai"

    def __init__(self, model: ModelSettings, engine: EngineSettings) -> None:
        if not model.upstream:
            raise ValueError("the openai backend needs --upstream URL (env ALLINONE_UPSTREAM)")
        self.base = model.upstream.rstrip("/")
        if not self.base.endswith("/v1"):
            self.base += "/v1"
        self.settings = model
        self.engine = engine
        self._model_id = model.model_id or ""
        self._upstream_model = model.upstream_model
        self._mode = model.choice_mode
        source = Path(model.chat_template).read_text("utf-8") if model.chat_template else None
        self._template = ChatTemplate(source)
        self._pool = ThreadPoolExecutor(engine.parallel, thread_name_prefix="upstream")
        self._pending = 0
        self._lock = threading.Lock()
        self._client: httpx.Client | None = None
        self.load_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        headers = {}
        if self.settings.upstream_api_key:
            headers["Authorization"] = f"Bearer {self.settings.upstream_api_key}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.settings.upstream_timeout_s, connect=5.0),
            limits=httpx.Limits(max_connections=self.engine.parallel + 2),
        )
        body = self._call("GET", "/models")
        models = body.get("data") or []
        ids = [m.get("id") for m in models]
        if self._upstream_model is None:
            if not ids:
                raise UpstreamError(f"the upstream {self.base} lists no models")
            self._upstream_model = ids[0]
        elif self._upstream_model not in ids:
            raise UpstreamError(
                f"the upstream has no model {self._upstream_model!r}; it serves {ids}"
            )
        owner = next((m.get("owned_by") for m in models if m.get("id") == self._upstream_model), "")
        if self._mode == "auto":
            # vLLM reports owned_by "vllm"; llama.cpp servers accept a GBNF grammar; for others a
            # grammar field is ignored and the strict answer check still applies.
            self._mode = "vllm" if owner == "vllm" else "grammar"
        self._model_id = self._model_id or self._upstream_model
        log.info(
            "upstream %s model %s (choice mode %s)", self.base, self._upstream_model, self._mode
        )

    def health(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None:
            self._client.close()
            self._client = None

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_tokens(self) -> int:
        return self.engine.ctx_per_seq

    def count_tokens(self, text: str) -> int:
        # The upstream's tokenizer is not here: a conservative estimate (about 3 UTF-8 bytes a
        # token; CJK characters are 3 bytes and usually one token) bounds chat history.
        return max(1, len(text.encode("utf-8")) // 3)

    def stats(self) -> dict[str, Any]:
        return {"upstream": self.base, "pending": self._pending, "choice_mode": self._mode}

    # -- HTTP --------------------------------------------------------------------------------
    def _call(self, method: str, path: str, **kw) -> dict:
        if self._client is None:
            raise BackendError("the upstream backend is not loaded")
        try:
            r = self._client.request(method, self.base + path, **kw)
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"the upstream {self.base} timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream {self.base} is unreachable: {exc}") from exc
        _check_status(r)
        return r.json()

    def _submit(self, fn, handle: RequestHandle) -> RequestHandle:
        with self._lock:
            if self._pending >= self.engine.parallel + self.engine.max_queue:
                raise EngineOverloadedError("the upstream queue is full; retry later")
            self._pending += 1

        def run() -> None:
            try:
                if not handle.cancelled.is_set():
                    fn(handle)
                else:
                    handle.finish(Finished("cancelled", Usage()))
            except BaseException as exc:
                known = isinstance(exc, BackendError | PromptTooLongError)
                handle.fail(exc if known else UpstreamError(str(exc)))
            finally:
                with self._lock:
                    self._pending -= 1

        self._pool.submit(run)
        return handle

    @staticmethod
    def _text(prompt: Prompt) -> str:
        return "".join(s.text for s in (*prompt.prefix, *prompt.body))

    # -- work --------------------------------------------------------------------------------
    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        text = self._text(prompt)
        return self._submit(lambda h: self._score(h, text, choices), RequestHandle())

    def _score(self, handle: RequestHandle, text: str, choices: list[str]) -> None:
        body: dict[str, Any] = {
            "model": self._upstream_model,
            "prompt": text,
            "max_tokens": 16,
            "temperature": 0,
            "logprobs": TOP_LOGPROBS,
        }
        if self._mode == "vllm":
            body["structured_outputs"] = {"choice": choices}
        elif self._mode == "grammar":
            body["grammar"] = choice_grammar(choices)
        out = self._call("POST", "/completions", json=body)
        choice = (out.get("choices") or [{}])[0]
        answer = (choice.get("text") or "").strip()
        lp = choice.get("logprobs") or {}
        top = lp["top_logprobs"][0] if lp.get("top_logprobs") else None
        # logprobs mode: an unconstrained answer may be anything; the labels' first tokens decide.
        scores = label_logprobs(choices, answer, top)
        if answer not in choices and not (self._mode == "logprobs" and max(scores) > -math.inf):
            raise UpstreamError(
                f"the upstream answered {answer[:80]!r}, not one of {choices}; it may not support "
                "constrained choice (set ALLINONE_CHOICE_MODE: vllm, grammar or logprobs)"
            )
        usage = out.get("usage") or {}
        handle.finish(
            Finished(
                "stop",
                Usage(usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)),
                scores,
            )
        )

    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        text = self._text(prompt)
        return self._submit(lambda h: self._generate(h, text, params), RequestHandle())

    def _generate(self, handle: RequestHandle, prompt: str, params: GenerationParams) -> None:
        body: dict[str, Any] = {
            "model": self._upstream_model,
            "prompt": prompt,
            "max_tokens": params.max_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if self._client is None:
            raise BackendError("the upstream backend is not loaded")
        out, pieces = "", 0
        reason: FinishReason = "length"
        try:
            with self._client.stream("POST", self.base + "/completions", json=body) as r:
                if r.status_code >= 400:
                    r.read()
                    _check_status(r)
                for line in r.iter_lines():
                    if handle.cancelled.is_set():
                        reason = "cancelled"
                        break
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    chunk = json.loads(data)
                    c = (chunk.get("choices") or [{}])[0]
                    delta = c.get("text") or ""
                    if params.max_chars is not None and len(out) + len(delta) >= params.max_chars:
                        delta = delta[: params.max_chars - len(out)]
                        out += delta
                        if delta:
                            handle.emit_text(delta)
                        reason = "length"
                        break
                    if delta:
                        out += delta
                        pieces += 1
                        handle.emit_text(delta)
                    if c.get("finish_reason"):
                        reason = "stop" if c["finish_reason"] == "stop" else "length"
        except httpx.TimeoutException as exc:
            raise UpstreamTimeoutError(f"the upstream {self.base} timed out") from exc
        except httpx.HTTPError as exc:
            raise UpstreamError(f"the upstream {self.base} is unreachable: {exc}") from exc
        usage = Usage(self.count_tokens(prompt), pieces)
        handle.finish(Finished(reason, usage, out))


def _check_status(r: httpx.Response) -> None:
    """Upstream errors: a prompt beyond the upstream's context is the caller's 400, the rest 502."""
    if r.status_code < 400:
        return
    message = _message(r)
    if r.status_code == 400 and "context" in message.lower():
        raise PromptTooLongError(f"the upstream model's context is too small: {message}")
    raise UpstreamError(f"the upstream answered {r.status_code}: {message}")


def _message(r: httpx.Response) -> str:
    try:
        err = r.json().get("error")
        if isinstance(err, dict):
            return str(err.get("message"))[:300]
        return str(err or r.text)[:300]
    except ValueError:
        return r.text[:300]
