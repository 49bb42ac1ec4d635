"""Constrained decoding with llguidance: a grammar compiled per request, a token mask per step.

llguidance (Microsoft's grammar engine, also behind vLLM's and llama.cpp's ``--llguidance``
structured outputs) compiles JSON schemas and Lark grammars itself, so nothing here converts a
schema by hand. Its tokenizer is built once from the llama.cpp vocabulary (~1 s on 152k tokens,
done on first use so a server that never constrains pays nothing). Per step the engine asks
the request's matcher for a bitmask of allowed next tokens (measured in
``benchmarks/bench_structured.py``), masks the logits, samples, and feeds the token back.
"""

from __future__ import annotations

import json
import threading
import warnings
from typing import Any

import numpy as np

from allinone.backends.base import GrammarError


class TokenGrammar:
    """A compiled grammar; ``matcher()`` gives each request its own parser state."""

    def __init__(self, tokenizer: Any, grammar: str, n_vocab: int) -> None:
        import llguidance

        self._llg = llguidance
        self._tokenizer = tokenizer
        self.grammar = grammar
        self.n_vocab = n_vocab

    def matcher(self) -> TokenMatcher:
        """A fresh parser state for one request."""
        m = self._llg.LLMatcher(self._tokenizer, self.grammar, log_level=0)
        if m.is_error():
            raise GrammarError(m.get_error())
        return TokenMatcher(m, self.n_vocab)


class TokenMatcher:
    """One request's parser state: which tokens may come next, and the tokens taken so far.

    Not thread-safe; the engine loop's thread is its only user once the request is queued."""

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self._m = matcher
        self.n_vocab = n_vocab
        self._mask = np.zeros((1, (n_vocab + 31) // 32), dtype=np.int32)

    def allows(self, token: int) -> bool:
        """Whether the grammar accepts ``token`` next (computes this step's mask: ~0.1 ms on
        the default model's vocabulary, the cost bench_structured measures per token)."""
        self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        if not 0 <= token < self.n_vocab:
            return False
        return bool((int(self._mask[0, token >> 5]) >> (token & 31)) & 1)

    def allowed(self) -> np.ndarray:
        """Boolean array of shape (n_vocab,): True where the grammar accepts the token next."""
        self._m.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        bits = np.unpackbits(self._mask.view(np.uint8), bitorder="little")
        out = np.zeros(self.n_vocab, dtype=bool)
        n = min(self.n_vocab, bits.shape[0])
        out[:n] = bits[:n].astype(bool)
        return out

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """A float64 copy of ``logits`` (shape (n_vocab,)) with every token the grammar forbids
        at -inf. GrammarError if it forbids all."""
        allowed = self.allowed()
        if not allowed.any():
            raise GrammarError("the grammar allows no next token")
        x = logits.astype(np.float64)
        x[~allowed] = -np.inf
        return x

    def accept(self, token: int) -> None:
        """Advance past a sampled token; GrammarError if the grammar did not allow it."""
        if not self._m.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self._m.get_error()}")

    @property
    def done(self) -> bool:
        """True when the grammar accepts nothing more (the reply is complete)."""
        return bool(self._m.is_stopped())


class GrammarCompiler:
    """Compiles JSON schemas and Lark grammars for one vocabulary (thread-safe)."""

    def __init__(self, vocab: Any, n_vocab: int, is_eog: Any) -> None:
        self._vocab = vocab
        self.n_vocab = n_vocab
        self._is_eog = is_eog
        self._tokenizer: Any = None
        self.slices: list[str] | None = None
        self._lock = threading.Lock()

    def tokenizer(self) -> Any:
        """llguidance's view of the vocabulary, built on first use."""
        with self._lock:
            if self._tokenizer is None:
                from llguidance.llamacpp import lltokenizer_from_vocab

                # Every end-of-generation token ends a grammar's reply: Qwen's chat turns end
                # with <|im_end|>, not with the vocabulary's EOS (<|endoftext|>).
                eog = [t for t in range(self.n_vocab) if self._is_eog(t)]
                with warnings.catch_warnings():  # it calls a llama.cpp alias deprecated
                    warnings.simplefilter("ignore", DeprecationWarning)  # in 0.3.36, per token
                    self._tokenizer = lltokenizer_from_vocab(
                        self._vocab, eos_token=eog or None, slices=self.slices
                    )
            return self._tokenizer

    def json_schema(self, schema: dict[str, Any] | None) -> TokenGrammar:
        """A grammar for JSON documents valid under ``schema`` (None: any JSON object).

        Raises GrammarError when llguidance cannot compile the schema (the message says why)."""
        from llguidance import LLMatcher

        doc = {"type": "object"} if schema is None else schema
        try:
            grammar = LLMatcher.grammar_from_json_schema(
                json.dumps(doc), defaults={"whitespace_flexible": False}
            )
        except ValueError as exc:
            raise GrammarError(str(exc)) from None
        return self._checked(grammar)

    def lark(self, source: str) -> TokenGrammar:
        """A grammar from Lark source (llguidance's dialect, which embeds ``%json {...}``)."""
        from llguidance import LLMatcher

        return self._checked(LLMatcher.grammar_from_lark(source))

    def _checked(self, grammar: str) -> TokenGrammar:
        from llguidance import LLMatcher

        tok = self.tokenizer()
        error = LLMatcher.validate_grammar(grammar, tok)
        if error and not error.startswith("WARNING"):
            raise GrammarError(error)
        g = TokenGrammar(tok, grammar, self.n_vocab)
        g.matcher()  # a grammar that cannot start fails here, before the request is queued
        return g
