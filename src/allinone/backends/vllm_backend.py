"""The vLLM backend, in process, for GPUs: vLLM's async engine with tensor parallelism, prefix
caching, and structured-output choice for classification.

An optional extra (``pip install vllm``; never installed by ``make test``). The engine runs on its
own asyncio loop in a background thread; each request is a coroutine on that loop whose outputs
are forwarded to the request's handle. Untested on this project's CPU-only machines: its tests
skip without CUDA.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

from allinone.backends.base import (
    Backend,
    BackendError,
    EngineOverloadedError,
    Finished,
    GenerationParams,
    Prompt,
    PromptTooLongError,
    RequestHandle,
    Usage,
)
from allinone.backends.chat_template import ChatTemplate
from allinone.backends.remote import label_logprobs
from allinone.serving.errors import InputError
from allinone.settings import EngineSettings

log = logging.getLogger(__name__)


def _choice_params(choices: list[str]) -> dict[str, Any]:
    """SamplingParams keyword for a constrained choice, for old and new vLLM releases."""
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(choice=choices)}
    except ImportError:  # vLLM < 0.10.2
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(choice=choices)}


class VLLMBackend(Backend):
    """A Hugging Face model (folder or hub id in the local cache) served by vLLM on GPUs."""

    name: ClassVar[str] = "vllm"

    def __init__(self, model_path: Path | str, engine: EngineSettings, model_id: str) -> None:
        self.model = str(model_path)
        self.settings = engine
        self._model_id = model_id
        self._ids = itertools.count()
        self._pending = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.load_seconds: float | None = None

    def load(self) -> None:
        from vllm import AsyncEngineArgs, AsyncLLMEngine

        t0 = time.perf_counter()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="vllm-loop", daemon=True).start()
        args = AsyncEngineArgs(
            model=self.model,
            tensor_parallel_size=self.settings.tensor_parallel,
            max_model_len=self.settings.ctx_per_seq,
            max_num_seqs=self.settings.parallel,
            gpu_memory_utilization=self.settings.gpu_memory_utilization,
            enable_prefix_caching=True,  # task prefixes are shared by vLLM's block cache
        )

        async def start():
            return AsyncLLMEngine.from_engine_args(args)

        self.engine = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(self.model)
        self._template = ChatTemplate(self.tok.chat_template, (self.tok.bos_token or "", False))
        self.load_seconds = time.perf_counter() - t0

    def health(self) -> bool:
        return self._loop is not None and self._loop.is_running()

    def close(self) -> None:
        if self._loop is not None:
            if hasattr(self.engine, "shutdown"):
                self.engine.shutdown()
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop = None

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_tokens(self) -> int:
        return self.settings.ctx_per_seq

    def count_tokens(self, text: str) -> int:
        return len(self.tok(text, add_special_tokens=False)["input_ids"])

    def stats(self) -> dict[str, Any]:
        return {"pending": self._pending}

    # -- requests ----------------------------------------------------------------------------
    def _submit(self, prompt: Prompt, sampling, on_output) -> RequestHandle:
        if not self.health():
            raise BackendError("the model is not loaded")
        text = "".join(s.text for s in (*prompt.prefix, *prompt.body))
        if not text:
            # An empty completion prompt starts a document (OpenAI's behaviour), from BOS.
            text = self.tok.bos_token or ""
            if not text:
                raise InputError("the prompt has no tokens; send some text", "prompt")
        if self.count_tokens(text) + 1 > self.settings.ctx_per_seq:
            raise PromptTooLongError(
                f"the prompt does not fit {self.settings.ctx_per_seq} tokens (ALLINONE_CTX_PER_SEQ)"
            )
        with self._lock:
            if self._pending >= self.settings.parallel + self.settings.max_queue:
                raise EngineOverloadedError("the wait queue is full; retry later")
            self._pending += 1
        handle = RequestHandle()
        request_id = f"allinone-{next(self._ids)}"

        async def run() -> None:
            try:
                last = None
                async for out in self.engine.generate(text, sampling, request_id):
                    if handle.cancelled.is_set():
                        await self.engine.abort(request_id)
                        handle.finish(Finished("cancelled", Usage()))
                        return
                    on_output(handle, out, last)
                    last = out
                on_output(handle, last, None, final=True)
            except Exception as exc:
                handle.fail(exc if isinstance(exc, BackendError) else BackendError(str(exc)))
            finally:
                with self._lock:
                    self._pending -= 1

        assert self._loop is not None  # started by load()
        asyncio.run_coroutine_threadsafe(run(), self._loop)
        return handle

    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        from vllm import SamplingParams

        sampling = SamplingParams(
            temperature=0, max_tokens=16, logprobs=10, **_choice_params(choices)
        )

        def on_output(handle, out, _prev, final=False):
            if not final:
                return
            o = out.outputs[0]
            answer = o.text.strip()
            if answer not in choices:
                raise BackendError(f"vLLM answered {answer!r}, not one of {choices}")
            top = None
            if o.logprobs:
                top = {lp.decoded_token: lp.logprob for lp in o.logprobs[0].values()}
            usage = Usage(len(out.prompt_token_ids), len(o.token_ids), out.num_cached_tokens or 0)
            handle.finish(Finished("stop", usage, label_logprobs(choices, answer, top)))

        return self._submit(prompt, sampling, on_output)

    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        from vllm import SamplingParams

        sampling = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            max_tokens=params.max_tokens,
            stop=params.stop or None,
            seed=params.seed,
        )

        def on_output(handle, out, prev, final=False):
            o = out.outputs[0]
            text = o.text[: params.max_chars] if params.max_chars else o.text
            if not final:
                before = prev.outputs[0].text if prev is not None else ""
                if params.max_chars:
                    before = before[: params.max_chars]
                if len(text) > len(before):
                    handle.emit_text(text[len(before) :])
                return
            reason = "stop" if o.finish_reason == "stop" else "length"
            usage = Usage(len(out.prompt_token_ids), len(o.token_ids), out.num_cached_tokens or 0)
            handle.finish(Finished(reason, usage, text))

        return self._submit(prompt, sampling, on_output)
