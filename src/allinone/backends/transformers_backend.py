"""The transformers backend: the original design's stack (PyTorch on CPU) behind the same tasks.

Loads a Hugging Face model folder, or a GGUF that transformers dequantises; the GGUF is converted
once to a safetensors folder in the model cache (later loads take seconds instead of ~40 s).
Classification reuses the task prefix's ``past_key_values`` and projects the last hidden state
onto the label rows of the output head only; generation is a plain token loop. One worker thread
runs requests one at a time (no continuous batching: that is the llama.cpp engine's job).
Needs the optional extra: ``pip install -r requirements-torch.txt``.
"""

from __future__ import annotations

import copy
import logging
import queue
import threading
import time
from collections import OrderedDict
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


def hf_folder(model_path: Path, cache_dir: Path | None = None) -> Path:
    """A Hugging Face folder for ``model_path``: itself, or its GGUF converted once (cached)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from allinone.models.fetch import default_cache_dir

    path = Path(model_path)
    if path.is_dir():
        return path
    out = (cache_dir or default_cache_dir()) / "hf" / path.stem
    if (out / "config.json").exists():
        return out
    t = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    # transformers refuses to save a model loaded from GGUF while it carries the GGUF quantizer
    # marker; the weights are already dequantised, so drop it.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out)  # a half-written folder is never mistaken for a converted one
    log.info("converted %s to %s in %.0f s", path.name, out, time.perf_counter() - t)
    return out


class TransformersBackend(Backend):
    """A causal LM in PyTorch (FP32 on CPU), one request at a time."""

    name: ClassVar[str] = "transformers"

    def __init__(self, model_path: Path, engine: EngineSettings, model_id: str) -> None:
        self.model_path = Path(model_path)
        self.settings = engine
        self._model_id = model_id
        self._queue: queue.Queue = queue.Queue(maxsize=engine.max_queue)
        self._prefixes: OrderedDict[tuple[int, ...], Any] = OrderedDict()
        self._thread: threading.Thread | None = None
        self._alive = False
        self.load_seconds: float | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        t0 = time.perf_counter()
        torch.set_num_threads(self.settings.threads)
        folder = hf_folder(self.model_path)
        self.tok = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.torch = torch
        bos = self.tok.bos_token or ""
        self._template = ChatTemplate(self.tok.chat_template, (bos, False))
        self._eos = {i for i in [self.tok.eos_token_id, *self._extra_eos()] if i is not None}
        self._alive = True
        self._thread = threading.Thread(target=self._loop, name="transformers", daemon=True)
        self._thread.start()
        self.load_seconds = time.perf_counter() - t0
        log.info("loaded %s with transformers in %.1f s", folder.name, self.load_seconds)

    def _extra_eos(self) -> list[int]:
        ids = []
        for text in ("<|im_end|>", "<|endoftext|>"):
            i = self.tok.convert_tokens_to_ids(text)
            if isinstance(i, int) and i != self.tok.unk_token_id:
                ids.append(i)
        return ids

    def health(self) -> bool:
        return self._alive and self._thread is not None and self._thread.is_alive()

    def close(self) -> None:
        if self._alive:
            self._alive = False
            self._queue.put(None)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_tokens(self) -> int:
        return self.settings.ctx_per_seq

    def stats(self) -> dict[str, Any]:
        return {"queue_depth": self._queue.qsize(), "cached_prefixes": len(self._prefixes)}

    # -- tokens ------------------------------------------------------------------------------
    def _ids(self, segments: tuple[Segment, ...]) -> list[int]:
        return hf_token_ids(self.tok, segments)

    def count_tokens(self, text: str) -> int:
        return len(self._ids((Segment(text),)))

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        n_prefix_messages: int,
        tools: list[dict] | None = None,
    ) -> Prompt:
        if not self._alive:
            raise BackendError("the model is not loaded")
        return self._template.render(messages, n_prefix_messages, tools)

    # -- submission --------------------------------------------------------------------------
    def _submit(self, kind: str, prompt: Prompt, arg: Any, n_new: int) -> RequestHandle:
        if not self.health():
            raise BackendError("the model is not loaded")
        prefix, body = self._ids(prompt.prefix), self._ids(prompt.body)
        if not body and prefix:
            # The body's last token gives the logits read: a prompt that is all prefix
            # evaluates its last prefix token as the body.
            prefix, body = prefix[:-1], prefix[-1:]
        if not body:
            bos = self.tok.bos_token_id if kind == "generate" else None
            if bos is None:
                raise InputError("the prompt has no tokens; send some text", "prompt")
            body = [int(bos)]  # an empty completion prompt starts a document, as OpenAI's
        if len(prefix) + len(body) + n_new > self.settings.ctx_per_seq:
            raise PromptTooLongError(
                f"the prompt takes {len(prefix) + len(body)} tokens and the reply needs up to "
                f"{n_new} more, but a sequence holds {self.settings.ctx_per_seq} tokens "
                "(ALLINONE_CTX_PER_SEQ); shorten the input or the history"
            )
        handle = RequestHandle()
        try:
            self._queue.put_nowait((kind, prefix, body, arg, handle))
        except queue.Full:
            raise EngineOverloadedError("the wait queue is full; retry later") from None
        return handle

    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        n = max(len(self._ids((Segment(c),))) for c in choices)
        return self._submit("score", prompt, choices, n)

    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        return self._submit("generate", prompt, params, 1)

    # -- the worker --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            kind, prefix, body, arg, handle = item
            if handle.cancelled.is_set():
                handle.finish(Finished("cancelled", Usage(len(prefix) + len(body))))
                continue
            try:
                with self.torch.inference_mode():
                    if kind == "score":
                        self._score(prefix, body, arg, handle)
                    else:
                        self._generate(prefix, body, arg, handle)
            except Exception as exc:
                log.exception("transformers request failed")
                handle.fail(BackendError(f"the engine failed: {exc}"))

    def _prefix_cache(self, prefix: list[int]):
        """past_key_values after the task prefix, computed once and copied per request."""
        key = tuple(prefix)
        if not prefix:
            return None, 0
        if key in self._prefixes:
            self._prefixes.move_to_end(key)
            return copy.deepcopy(self._prefixes[key]), len(prefix)
        ids = self.torch.tensor([prefix])
        cache = self.model.model(input_ids=ids, use_cache=True).past_key_values
        self._prefixes[key] = cache
        while len(self._prefixes) > max(1, self.settings.prefix_cache_size):
            self._prefixes.popitem(last=False)
        return copy.deepcopy(cache), 0

    def _hidden(self, ids: list[int], cache):
        out = self.model.model(
            input_ids=self.torch.tensor([ids]), past_key_values=cache, use_cache=True
        )
        return out.last_hidden_state[0], out.past_key_values

    def _score(self, prefix, body, choices: list[str], handle: RequestHandle) -> None:
        torch = self.torch
        cache, cached = self._prefix_cache(prefix)
        hidden, cache = self._hidden(body, cache)
        last = hidden[-1]
        head = self.model.lm_head.weight
        label_ids = [self._ids((Segment(c),)) for c in choices]
        # First tokens: the label rows of the head only. Their normaliser is shared by every
        # label, so it cancels when probabilities are taken across the labels.
        firsts = torch.tensor([ids[0] for ids in label_ids])
        first_logits = head[firsts] @ last
        scores = []
        for i, ids in enumerate(label_ids):
            total = float(first_logits[i])
            if len(ids) > 1:  # later tokens need a full normaliser: the label branches off
                h, _ = self._hidden(ids[:-1], copy.deepcopy(cache))
                logp = torch.log_softmax(self.model.lm_head(h), dim=-1)
                total += float(sum(logp[j, t] for j, t in enumerate(ids[1:])))
            scores.append(total)
        # Turn first-token logits into log-probabilities over the labels' first tokens.
        norm = float(torch.logsumexp(first_logits, dim=0))
        scores = [s - norm for s in scores]
        handle.finish(Finished("stop", Usage(len(prefix) + len(body), 0, cached), scores))

    def _generate(self, prefix, body, params: GenerationParams, handle: RequestHandle) -> None:
        torch = self.torch
        cache, cached = self._prefix_cache(prefix)
        gen = torch.Generator()
        if params.seed is not None:
            gen.manual_seed(params.seed)
        else:
            gen.seed()  # a fresh seed: only an explicit one may repeat a sample
        ids = body
        out_ids: list[int] = []
        text = ""
        reason: FinishReason = "length"
        room = self.settings.ctx_per_seq - len(prefix) - len(body)
        for _ in range(min(params.max_tokens, room)):
            if handle.cancelled.is_set():
                reason = "cancelled"
                break
            hidden, cache = self._hidden(ids, cache)
            logits = self.model.lm_head(hidden[-1])
            if params.temperature <= 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits / params.temperature, dim=-1)
                if params.top_p < 1.0:
                    sp, si = torch.sort(probs, descending=True)
                    keep = torch.cumsum(sp, 0) - sp < params.top_p
                    probs = torch.zeros_like(probs).scatter(0, si[keep], sp[keep])
                token = int(torch.multinomial(probs, 1, generator=gen))
            if token in self._eos:
                reason = "stop"
                break
            out_ids.append(token)
            ids = [token]
            new = str(self.tok.decode(out_ids, skip_special_tokens=True))
            if new.endswith("\ufffd"):
                continue  # an unfinished UTF-8 sequence: wait for its next token
            delta, text = new[len(text) :], new
            stop_at = min((text.find(s) for s in params.stop if s in text), default=-1)
            if stop_at >= 0:
                delta = delta[: max(0, len(delta) - (len(text) - stop_at))]
                text, reason = text[:stop_at], "stop"
            if params.max_chars is not None and len(text) >= params.max_chars:
                cut = len(text) - params.max_chars
                delta, text = delta[: len(delta) - cut] if cut else delta, text[: params.max_chars]
                reason = "length"
            if delta:
                handle.emit_text(delta)
            if reason == "stop" or (params.max_chars is not None and len(text) >= params.max_chars):
                break
        usage = Usage(len(prefix) + len(body), len(out_ids), cached)
        handle.finish(Finished(reason, usage, text))
