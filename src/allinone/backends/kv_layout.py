"""How the llama.cpp engine lays out its one unified KV cache: cells and sequence ids.

The single source for the engine (context size, sequence pools) and for the planner (memory).
Sequence ids, in order: ``parallel`` request slots, ``prefix_cache_size`` cached task prefixes,
then ``parallel x max_choices`` scratch sequences (at most llama.cpp's ``LLAMA_MAX_SEQ`` in all)
for branches: decision questions evaluated on a copy of the input's cells, and labels of several
tokens. Cells: each slot's context share (a request's branches count against its slot's share),
the prefix budget, and ``SCRATCH_CELLS_PER_SLOT`` per slot of slack for label branches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCRATCH_CELLS_PER_SLOT = 256
# llama.cpp's LLAMA_MAX_SEQ (src/llama-cparams.h of the vendored 0.3.36 sources): a context
# allows at most this many sequence ids.
LLAMA_MAX_SEQ = 256


@dataclass(frozen=True)
class KVLayout:
    """Pool sizes of one engine; ``n_cells`` and ``n_seq_max`` size the llama.cpp context."""

    parallel: int
    ctx_per_seq: int
    prefix_cache_size: int
    prefix_cache_tokens: int
    max_choices: int

    @classmethod
    def of(cls, engine: Any) -> KVLayout:
        """From an ``EngineSettings`` (or anything with the same attributes)."""
        return cls(
            engine.parallel,
            engine.ctx_per_seq,
            engine.prefix_cache_size,
            engine.prefix_cache_tokens,
            engine.max_choices,
        )

    @property
    def n_cells(self) -> int:
        """KV cells of the context: slots' shares + prefix budget + scratch."""
        return (
            self.parallel * self.ctx_per_seq
            + self.prefix_cache_tokens
            + self.parallel * SCRATCH_CELLS_PER_SLOT
        )

    @property
    def n_seq_max(self) -> int:
        """Sequence ids the context must allow."""
        return self.parallel + self.prefix_cache_size + self.n_scratch

    @property
    def n_scratch(self) -> int:
        """Scratch sequence ids, shared by every request's branches."""
        return min(
            self.parallel * self.max_choices,
            LLAMA_MAX_SEQ - self.parallel - self.prefix_cache_size,
        )

    @property
    def slots(self) -> range:
        """Request slots' sequence ids."""
        return range(self.parallel)

    @property
    def prefix_seqs(self) -> range:
        """Cached prefixes' sequence ids."""
        return range(self.parallel, self.parallel + self.prefix_cache_size)

    @property
    def scratch_seqs(self) -> range:
        """Label branches' sequence ids."""
        start = self.parallel + self.prefix_cache_size
        return range(start, start + self.n_scratch)
