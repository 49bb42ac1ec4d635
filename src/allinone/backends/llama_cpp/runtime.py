"""A thin, typed wrapper over llama.cpp's C API (via llama-cpp-python's ctypes bindings).

Only the engine thread calls the context methods (decode, logits, sequence ops); tokenizing and
detokenizing touch the read-only vocabulary and are safe from any thread.
"""

from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allinone.backends import host_check

log = logging.getLogger(__name__)


class LlamaRuntimeError(RuntimeError):
    """llama.cpp refused to load a model or create a context."""


@dataclass(frozen=True)
class ContextShape:
    """How the context is sized: total KV cells, sequences, step size, threads."""

    n_ctx: int
    n_seq_max: int
    n_batch: int
    threads: int
    # One KV buffer for all sequences (the engine needs it: see below). False gives each
    # sequence its own buffer, as llama-server's slots have (benchmarks/bench_kv_spread.py).
    kv_unified: bool = True


_native_log = logging.getLogger("allinone.llama_cpp.native")
_log_callback = None  # a reference must outlive every call from C


def _llama():
    global _log_callback
    # libgomp reads this once, when llama.cpp's CPU backend loads it. With its default
    # (spin 300,000 times at each barrier, then sleep) a 2-thread decode on a virtualised Intel
    # host stopped for good, both threads spinning in a barrier, once uvicorn began a graceful
    # shutdown (test_stability's drain test: 6 of 9 runs; none with PASSIVE, nor with 1
    # thread). PASSIVE sleeps at once; decode speed measured the same (docs/limits.md).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import llama_cpp

    if _log_callback is None:
        # llama.cpp prints every tensor and vocabulary quirk at load; route its messages to
        # Python logging instead of stderr: ggml's level 4 is an error, 3 a warning (INFO here:
        # its load-time warnings are about model files, not about serving).
        @llama_cpp.llama_log_callback
        def forward(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
            py_level = {4: logging.ERROR, 3: logging.INFO}.get(level, logging.DEBUG)
            _native_log.log(py_level, "%s", text.decode("utf-8", "replace").rstrip())

        _log_callback = forward
        llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
    return llama_cpp


class LlamaRuntime:
    """One loaded model and one context with a unified KV cache shared by many sequences."""

    def __init__(self, path: Path, shape: ContextShape) -> None:
        self.lib = lib = _llama()
        lib.llama_backend_init()
        mparams = lib.llama_model_default_params()
        # off where this host's build ran only without AMX / repacked weights (llama_build)
        mparams.use_extra_bufts = host_check.extra_bufts()
        self.model = lib.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise LlamaRuntimeError(f"llama.cpp could not load {path} (not a supported GGUF?)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = lib.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = lib.llama_model_n_ctx_train(self.model)
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = shape.n_ctx
        cparams.n_batch = shape.n_batch
        cparams.n_ubatch = shape.n_batch
        cparams.n_seq_max = shape.n_seq_max
        cparams.n_threads = shape.threads
        cparams.n_threads_batch = shape.threads
        # One KV buffer for all sequences: copying a task prefix into a request's sequence then
        # only tags the prefix cells with one more sequence id instead of duplicating them.
        cparams.kv_unified = shape.kv_unified
        cparams.no_perf = True
        self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lib.llama_model_free(self.model)
            raise LlamaRuntimeError(
                f"llama.cpp could not create a context of {shape.n_ctx} tokens for "
                f"{shape.n_seq_max} sequences: lower ALLINONE_CTX_PER_SEQ or ALLINONE_PARALLEL"
            )
        self.mem = lib.llama_get_memory(self.ctx)
        self.shape = shape
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self._batch = lib.llama_batch_init(shape.n_batch, 0, 1)
        self._n = 0
        self._piece_buf = ctypes.create_string_buffer(256)

    def system_info(self) -> str:
        """llama.cpp's build and SIMD paths (``llama_print_system_info``)."""
        return self.lib.llama_print_system_info().decode("utf-8", "replace").strip()

    def warm_up(self, n_tokens: int = 64) -> None:
        """One batched decode of ``n_tokens`` tokens in sequence 0, then forget them.

        Large batches take other matrix kernels than single tokens (AMX, for one): a library
        that cannot run them here fails now, at start-up, not at the first request.
        Raises LlamaRuntimeError when llama.cpp returns an error code.
        """
        n = min(n_tokens, self.shape.n_batch)
        self.batch_clear()
        for i in range(n):
            self.batch_add((97 + 31 * i) % self.n_vocab, i, 0, i == n - 1)
        rc = self.decode()
        self.seq_rm(0)
        self.batch_clear()
        if rc != 0:
            raise LlamaRuntimeError(f"llama.cpp failed a {n}-token warm-up decode (code {rc})")

    # -- vocabulary (any thread) -------------------------------------------------------------
    def tokenize(self, text: str, special: bool) -> list[int]:
        """Token ids of ``text``; ``special`` parses control tokens such as ``<|im_start|>``."""
        if not text:
            return []
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 16))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, special)
        if n < 0:  # pragma: no cover - buffer is always large enough (<= 1 token per byte + BOS)
            buf = (self.lib.llama_token * -n)()
            n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), False, special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        """The bytes of one token (control tokens render as nothing)."""
        n = self.lib.llama_token_to_piece(self.vocab, token, self._piece_buf, 256, 0, False)
        if n < 0:  # pragma: no cover - no token is longer than 256 bytes in practice
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, False)
            return buf.raw[:n]
        return self._piece_buf.raw[:n]

    def token_text(self, token: int) -> bytes:
        """The bytes of one token, control tokens as their text (``<|im_start|>``), as
        llama.cpp's server detokenizes. Safe from any thread: its own buffer (``piece``'s is the
        engine thread's)."""
        buf = ctypes.create_string_buffer(256)
        n = self.lib.llama_token_to_piece(self.vocab, token, buf, 256, 0, True)
        if n < 0:  # pragma: no cover - no token is longer than 256 bytes in practice
            buf = ctypes.create_string_buffer(-n)
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, -n, 0, True)
        return buf.raw[:n]

    def is_eog(self, token: int) -> bool:
        """True for end-of-generation tokens (EOS, ``<|im_end|>``, ...)."""
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    def bos_id(self) -> int:
        """The BOS token's id, -1 when the vocabulary has none."""
        return int(self.lib.llama_vocab_bos(self.vocab))

    def bos_token(self) -> tuple[str, bool]:
        """The BOS token's text and whether the model wants it prepended."""
        tok = self.lib.llama_vocab_bos(self.vocab)
        add = bool(self.lib.llama_vocab_get_add_bos(self.vocab))
        if tok < 0:
            return "", False
        n = self.lib.llama_token_to_piece(self.vocab, tok, self._piece_buf, 256, 0, True)
        return self._piece_buf.raw[: max(n, 0)].decode("utf-8", "replace"), add

    def chat_template(self) -> str | None:
        """The chat template stored in the GGUF, if any."""
        raw = self.lib.llama_model_chat_template(self.model, None)
        return raw.decode("utf-8") if raw else None

    def model_bytes(self) -> int:
        """Bytes of all tensors of the model."""
        return int(self.lib.llama_model_size(self.model))

    # -- context (engine thread only) --------------------------------------------------------
    def batch_clear(self) -> None:
        """Start a new batch."""
        self._n = 0

    def batch_truncate(self, n: int) -> None:
        """Drop the batch's tokens from index ``n`` on (a request that failed while its tokens
        were being added)."""
        self._n = min(self._n, max(n, 0))

    @property
    def batch_size(self) -> int:
        """Tokens in the current batch."""
        return self._n

    def batch_add(self, token: int, pos: int, seq: int, logits: bool) -> int:
        """Append one token of sequence ``seq`` at position ``pos``; returns its batch index."""
        b, i = self._batch, self._n
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq
        b.logits[i] = 1 if logits else 0
        self._n = i + 1
        return i

    def decode(self) -> int:
        """Evaluate the current batch; llama.cpp's return code (0 = success)."""
        self._batch.n_tokens = self._n
        return int(self.lib.llama_decode(self.ctx, self._batch))

    def logits(self, batch_index: int) -> np.ndarray:
        """Logits of the token at ``batch_index`` of the last decode (a view, valid until the
        next decode)."""
        ptr = self.lib.llama_get_logits_ith(self.ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def seq_rm(self, seq: int) -> None:
        """Forget every cell of sequence ``seq`` (cells shared with other sequences stay)."""
        self.lib.llama_memory_seq_rm(self.mem, seq, -1, -1)

    def seq_truncate(self, seq: int, n: int) -> bool:
        """Keep the first ``n`` positions of ``seq``, forget the rest; False if the memory
        cannot remove part of a sequence (then nothing was removed)."""
        return bool(self.lib.llama_memory_seq_rm(self.mem, seq, n, -1))

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Make ``dst`` share ``src``'s cells at positions [p0, p1) (all by default; no copy in
        a unified KV cache)."""
        self.lib.llama_memory_seq_cp(self.mem, src, dst, p0, p1)

    def seq_state_size(self, seq: int) -> int:
        """Bytes ``seq_save`` would copy for ``seq``."""
        return int(self.lib.llama_state_seq_get_size(self.ctx, seq))

    def seq_save(self, seq: int) -> bytearray:
        """A copy of ``seq``'s cells (positions and K/V rows) for ``seq_restore``."""
        lib = self.lib
        size = lib.llama_state_seq_get_size(self.ctx, seq)
        data = bytearray(size)
        written = lib.llama_state_seq_get_data(
            self.ctx, (ctypes.c_uint8 * size).from_buffer(data), size, seq
        )
        del data[written:]
        return data

    def seq_restore(self, seq: int, data: bytearray) -> bool:
        """Replace ``seq``'s cells with saved ones; False (and ``seq`` empty) when the cache has
        no room for them."""
        buf = (ctypes.c_uint8 * len(data)).from_buffer(data)
        if self.lib.llama_state_seq_set_data(self.ctx, buf, len(data), seq) == 0:
            self.seq_rm(seq)
            return False
        return True

    def seq_pos_max(self, seq: int) -> int:
        """Largest position stored for ``seq`` (-1 when empty)."""
        return int(self.lib.llama_memory_seq_pos_max(self.mem, seq))

    def close(self) -> None:
        """Free the batch, the context and the model."""
        if getattr(self, "ctx", None):
            self.lib.llama_batch_free(self._batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            self.lib.llama_model_free(self.model)
            self.model = None
