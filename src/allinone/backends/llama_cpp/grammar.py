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


class GrammarDeadEnd(GrammarError):
    """The grammar allows no next token although the reply is not complete: a schema that
    compiles but has no finite instance (e.g. a required property that refers back to the
    whole schema). The engine ends such a reply as cut (finish reason ``length``)."""


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
        at -inf. GrammarDeadEnd if it forbids all."""
        allowed = self.allowed()
        if not allowed.any():
            raise GrammarDeadEnd(f"the grammar allows no next token; {self._first_error()}")
        x = logits.astype(np.float64)
        x[~allowed] = -np.inf
        return x

    def accept(self, token: int) -> None:
        """Advance past a sampled token (one its mask allowed). GrammarDeadEnd when the parser
        cannot go on from there: llguidance gives up on a grammar whose forced continuation
        never ends (its item limit), and stays in that error state."""
        if not self._m.consume_token(token):
            raise GrammarDeadEnd(f"after token {token}: {self._first_error()}")

    def check_forced(self) -> None:
        """Take the text the grammar forces from here (its fast-forward tokens); GrammarError
        when the parser gives up on it, as it does for a schema whose every instance is
        endless (a required property that refers back to the whole schema)."""
        forced = self._m.compute_ff_tokens()
        if self._m.is_error() or not self._m.consume_tokens(forced):
            raise GrammarError(
                "the schema forces a reply that never ends (no finite JSON document satisfies "
                f"it): {self._first_error()}"
            )

    def _first_error(self) -> str:
        """The first line of llguidance's error (it goes on with its parser's state)."""
        lines = (self._m.get_error() or "").splitlines()
        return lines[0] if lines else "no error reported"

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
        # A grammar that cannot start, or whose forced start never ends, fails here, before the
        # request is queued (~0.1 ms for a usual schema).
        start = g.matcher()
        start.check_forced()
        first = np.flatnonzero(start.allowed())
        if 0 < first.size <= 64 and all(self._is_eog(int(t)) for t in first):
            # Only the end of the reply may come first: the schema admits no JSON value at all
            # (a definition that is nothing but a reference to itself), so every reply would be
            # an empty "success".
            raise GrammarError(
                "the grammar admits only an empty reply (a schema that refers only to itself "
                "admits no JSON value); give the schema a type"
            )
        return g
