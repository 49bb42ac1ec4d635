"""The llama.cpp backend: a GGUF model, its chat template, and the continuous-batching loop."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any, ClassVar

from allinone.backends.base import (
    Backend,
    BackendError,
    GenerationParams,
    Prompt,
    PromptTooLongError,
    RequestHandle,
    ScoreBranch,
    Segment,
)
from allinone.backends.chat_template import ChatTemplate
from allinone.backends.kv_layout import KVLayout
from allinone.backends.llama_cpp.engine_loop import EngineLoop
from allinone.backends.llama_cpp.grammar import GrammarCompiler
from allinone.backends.llama_cpp.request import Branch, Request
from allinone.backends.llama_cpp.runtime import ContextShape, LlamaRuntime
from allinone.serving.errors import InputError
from allinone.settings import EngineSettings

log = logging.getLogger(__name__)


class LlamaCppBackend(Backend):
    """Runs a GGUF model with llama.cpp: one context, many sequences, one engine thread."""

    name: ClassVar[str] = "llama_cpp"
    capabilities: ClassVar[frozenset[str]] = frozenset(
        {
            "grammar",
            "logit_bias",
            "penalties",
            "logprobs",
            "top_k",
            "min_p",
            "repetition_penalty",
            "answer_scoring",
        }
    )

    def __init__(self, model_path: Path, engine: EngineSettings, model_id: str) -> None:
        self.model_path = Path(model_path)
        self.settings = engine
        self._model_id = model_id
        self.rt: LlamaRuntime | None = None
        self.loop: EngineLoop | None = None
        self.load_seconds: float | None = None
        self._template: ChatTemplate | None = None
        self._prefix_tokens: OrderedDict[tuple, list[int]] = OrderedDict()
        self._lock = threading.Lock()
        self._grammars: GrammarCompiler | None = None
        self._prewarm: threading.Thread | None = None
        self._eot: int | None = None  # end-of-turn token (``_end_of_turn``)

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def context_tokens(self) -> int:
        return self.settings.ctx_per_seq

    def load(self) -> None:
        s = self.settings
        t0 = time.perf_counter()
        layout = KVLayout.of(s)
        n_ctx = layout.n_cells
        shape = ContextShape(
            n_ctx=n_ctx,
            n_seq_max=layout.n_seq_max,
            n_batch=s.n_batch,
            threads=s.threads,
        )
        if s.host_check:
            from allinone.backends.host_check import check_library_runs
            from allinone.models.fetch import default_cache_dir

            check_library_runs(self.model_path, default_cache_dir())
        self.rt = LlamaRuntime(self.model_path, shape)
        self.rt.warm_up()
        log.info("llama.cpp: %s", self.rt.system_info())
        self._template = ChatTemplate(self.rt.chat_template(), self.rt.bos_token())
        self._grammars = GrammarCompiler(self.rt.vocab, self.rt.n_vocab, self.rt.is_eog)
        if s.grammar_prewarm:
            # llguidance's view of a 152k vocabulary takes seconds to build: do it now, beside
            # serving, so the first structured request does not wait for it.
            self._prewarm = threading.Thread(
                target=self._grammars.tokenizer, name="allinone-grammar", daemon=True
            )
            self._prewarm.start()
        self.loop = EngineLoop(
            self.rt,
            parallel=s.parallel,
            ctx_per_seq=s.ctx_per_seq,
            prefix_cache_size=s.prefix_cache_size,
            prefix_cache_tokens=s.prefix_cache_tokens,
            max_choices=s.max_choices,
            max_queue=s.max_queue,
            seed=s.seed,
            reuse_slots=s.reuse_slots,
            prompt_cache_bytes=s.prompt_cache_mb * 1024 * 1024,
        )
        self.loop.start()
        self.load_seconds = time.perf_counter() - t0
        log.info(
            "loaded %s in %.2f s (n_ctx=%d, parallel=%d, threads=%d)",
            self.model_path.name,
            self.load_seconds,
            n_ctx,
            s.parallel,
            s.threads,
        )

    def failure(self) -> str | None:
        return self.loop.crash if self.loop is not None else None

    def health(self) -> bool:
        return self.loop is not None and self.loop.alive

    def _runtime(self) -> LlamaRuntime:
        if self.rt is None or self.loop is None or not self.loop.alive:
            raise BackendError("the model is not loaded")
        return self.rt

    def _loop(self) -> EngineLoop:
        if self.loop is None:
            raise BackendError("the model is not loaded")
        return self.loop

    def count_tokens(self, text: str) -> int:
        return len(self._runtime().tokenize(text, special=False))

    def tokenize(self, text: str, special: bool = False) -> list[int]:
        return self._runtime().tokenize(text, special=special)

    def detokenize(self, tokens: list[int]) -> str:
        rt = self._runtime()
        bad = [t for t in tokens if not 0 <= t < rt.n_vocab]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside the vocabulary (0..{rt.n_vocab - 1})", "tokens"
            )
        # Control tokens as their text (llama.cpp's server and vLLM do the same): a client
        # checking its own template sees <|im_start|>, not nothing.
        return b"".join(rt.token_text(t) for t in tokens).decode("utf-8", errors="replace")

    def json_grammar(self, schema: dict[str, Any] | None) -> Any:
        return self._compiler().json_schema(schema)

    def lark_grammar(self, source: str) -> Any:
        return self._compiler().lark(source)

    def _compiler(self) -> GrammarCompiler:
        self._runtime()
        assert self._grammars is not None  # set by load()
        return self._grammars

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        n_prefix_messages: int,
        tools: list[dict] | None = None,
    ) -> Prompt:
        self._runtime()
        assert self._template is not None  # set by load()
        return self._template.render(messages, n_prefix_messages, tools)

    def _tokens(self, segments: tuple[Segment, ...]) -> list[int]:
        rt = self._runtime()
        out: list[int] = []
        for seg in segments:
            out.extend(rt.tokenize(seg.text, special=seg.special))
        return out

    def _prefix(self, prompt: Prompt) -> list[int]:
        # Tokenizing a long system prompt on every request is wasted work; keep a few.
        with self._lock:
            cached = self._prefix_tokens.get(prompt.prefix)
            if cached is not None:
                self._prefix_tokens.move_to_end(prompt.prefix)
                return cached
        toks = self._tokens(prompt.prefix)
        with self._lock:
            self._prefix_tokens[prompt.prefix] = toks
            while len(self._prefix_tokens) > max(8, 2 * self.settings.prefix_cache_size):
                self._prefix_tokens.popitem(last=False)
        return toks

    def _check_fits(self, n_prompt: int, n_new: int) -> None:
        limit = self.settings.ctx_per_seq
        if n_prompt + n_new > limit:
            raise PromptTooLongError(
                f"the prompt takes {n_prompt} tokens and the reply needs up to {n_new} more, "
                f"but a sequence holds {limit} tokens (ALLINONE_CTX_PER_SEQ); shorten the input "
                "or the history"
            )

    def score_choices(self, prompt: Prompt, choices: list[str]) -> RequestHandle:
        if not 2 <= len(choices) <= self.settings.max_choices:
            raise ValueError(f"between 2 and {self.settings.max_choices} choices are needed")
        # A classification is a branch request with one branch and no suffix.
        branch = self._branch(ScoreBranch((), tuple(choices)), "a choice")
        req = self._request("score", prompt, branch.cells_needed + 1)
        req.branches = [branch]
        return self._loop().submit(req)

    def score_branches(self, prompt: Prompt, branches: list[ScoreBranch]) -> RequestHandle:
        if not branches:
            raise InputError("a branch request needs at least one branch")
        specs = [self._branch(b, f"branch {k}: a label") for k, b in enumerate(branches)]
        worst = max(specs, key=lambda b: b.cells_needed)
        req = self._request("score", prompt, 1)
        limit, n = self.settings.ctx_per_seq, len(req.prompt)
        if n + worst.cells_needed + 1 > limit:
            raise PromptTooLongError(
                f"the prompt (instructions and input) takes {n} tokens and its longest question "
                f"{worst.cells_needed} more, but a sequence holds {limit} tokens "
                "(ALLINONE_CTX_PER_SEQ); shorten the input or that question"
            )
        pool = KVLayout.of(self.settings).n_scratch
        if any(b.seqs_needed > pool for b in specs):
            raise InputError(
                f"a question's labels start in more than {pool} different ways; use labels of "
                "one token or labels that share their first tokens"
            )
        req.branches = specs
        req.nested_result = True
        return self._loop().submit(req)

    def _branch(self, branch: ScoreBranch, what: str) -> Branch:
        rt = self._runtime()
        labels = [rt.tokenize(label, special=False) for label in branch.labels]
        if not labels or any(not t for t in labels):
            raise InputError(f"{what} is empty after tokenization")
        if branch.end_turn:
            labels = [[*t, self._end_of_turn()] for t in labels]
        return Branch(tuple(self._tokens(branch.suffix)), labels)

    def _end_of_turn(self) -> int:
        """The token the chat template writes after an assistant reply (``<|im_end|>`` for
        ChatML), found once by rendering a reply: the first end-of-generation token of the
        markup after it. Raises InputError (``x_strategy``) for a template that writes none."""
        if self._eot is None:
            rt = self._runtime()
            assert self._template is not None  # loaded, as _runtime() checked
            rendered = self._template.render(
                [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}], 0
            )
            segs = [*rendered.prefix, *rendered.body]
            last = max(i for i, seg in enumerate(segs) if not seg.special and seg.text == "a")
            after = "".join(seg.text for seg in segs[last + 1 :])
            eog = [t for t in rt.tokenize(after, special=True) if rt.is_eog(t)]
            if not eog:
                raise InputError(
                    "this model's chat template ends a reply without an end-of-generation "
                    "token; ask with x_strategy codes",
                    param="x_strategy",
                )
            self._eot = eog[0]
        return self._eot

    def generate(self, prompt: Prompt, params: GenerationParams) -> RequestHandle:
        """Submit a generation; a prompt of no tokens starts from the BOS token (``_request``)."""
        return self._loop().submit(self._generate_request(prompt, params))

    def _generate_request(self, prompt: Prompt, params: GenerationParams) -> Request:
        rt = self._runtime()
        bad = [t for t in params.logit_bias if not 0 <= t < rt.n_vocab]
        if bad:
            raise InputError(
                f"token id {bad[0]} is outside this model's vocabulary (0..{rt.n_vocab - 1}); "
                "POST /tokenize gives the ids of a text",
                "logit_bias",
            )
        req = self._request("generate", prompt, 1)
        # Cap the reply to the room left rather than failing a long conversation outright.
        room = self.settings.ctx_per_seq - len(req.prompt)
        params.max_tokens = min(params.max_tokens, room)
        req.params = params
        return req

    def generate_n(self, prompt: Prompt, params: GenerationParams, n: int) -> list[RequestHandle]:
        if n == 1:
            return [self.generate(prompt, params)]
        if not 1 <= n <= self.settings.parallel:
            raise InputError(
                f"n={n}: this server runs {self.settings.parallel} sequences at once "
                "(ALLINONE_PARALLEL), so n is at most that",
                "n",
            )
        req = self._generate_request(prompt, params)
        for i in range(1, n):
            # each choice samples with its own seed (seed + i when the request sent one)
            seed = None if params.seed is None else params.seed + i
            fork = Request(
                kind="generate",
                handle=RequestHandle(),
                prefix_key=req.prefix_key,
                prefix_tokens=req.prefix_tokens,
                body_tokens=req.body_tokens,
                params=dataclasses.replace(req.params, seed=seed),
            )
            req.forks.append(fork)
        self._loop().submit(req)
        return [req.handle, *(f.handle for f in req.forks)]

    def _request(self, kind: str, prompt: Prompt, n_new: int) -> Request:
        """Tokenize a prompt (prefix cached) into an engine request, checking it fits.

        A generation whose prompt has no tokens (an empty /v1/completions prompt) starts from
        the model's BOS token, as OpenAI's and llama.cpp's servers generate from the start of
        a document; InputError (``prompt``) when the model has none, or for a scoring request
        (there is nothing to score after)."""
        prefix = self._prefix(prompt)
        body = self._tokens(prompt.body)
        if not prefix and not body:
            bos = self._runtime().bos_id() if kind == "generate" else -1
            if bos < 0:
                why = "this model has no BOS token to start from" if kind == "generate" else ""
                raise InputError(
                    f"the prompt has no tokens{'; ' + why if why else ''}; send some text",
                    "prompt",
                )
            body = [bos]
        self._check_fits(len(prefix) + len(body), n_new)
        return Request(
            kind=kind,
            handle=RequestHandle(),
            prefix_key=prompt.prefix,
            prefix_tokens=prefix,
            body_tokens=body,
        )

    def stats(self) -> dict[str, Any]:
        return self.loop.stats() if self.loop else {}

    def close(self) -> None:
        if self._prewarm is not None:
            # It reads the model's vocabulary: the model must outlive it (a close during the
            # build freed the vocabulary under it and crashed the process).
            self._prewarm.join()
            self._prewarm = None
        if self.loop is not None:
            self.loop.stop()
            self.loop = None
        if self.rt is not None:
            self.rt.close()
            self.rt = None
