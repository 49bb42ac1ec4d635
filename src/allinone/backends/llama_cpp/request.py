"""A request's state inside the llama.cpp engine: what it is, where it is in its life, and its
part of one step. The transitions are made by the engine loop (table in ``engine_loop``)."""

from __future__ import annotations

import codecs
import enum
import time
from dataclasses import dataclass, field

import numpy as np

from allinone.backends.base import FinishReason, GenerationParams, RequestHandle


class RequestState(enum.Enum):
    """Where a request is in its life; the ``FINISHED_*`` states say how it ended (vLLM's
    ``RequestStatus``). See the transition table in the module docstring."""

    WAITING = "waiting"  # queued, holds no sequence
    PREFILL = "prefill"  # its prompt's tokens are being evaluated in its slot
    DECODE = "decode"  # generating: one token a step
    SCORE_BRANCHES = "score_branches"  # labels of several tokens, on scratch sequences
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_CANCELLED = "cancelled"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        """True for the terminal states."""
        return self.name.startswith("FINISHED_")

    @classmethod
    def finished(cls, reason: FinishReason) -> RequestState:
        """The terminal state for a finish reason."""
        return {"stop": cls.FINISHED_STOPPED, "length": cls.FINISHED_LENGTH}.get(
            reason, cls.FINISHED_CANCELLED
        )


@dataclass
class StepPlan:
    """What one decode holds, per request: the batch row whose logits it reads (-1: none this
    step) and how many of its tokens were fed (to take them back if the decode fails)."""

    rows: dict[Request, tuple[int, int]] = field(default_factory=dict)

    def add(self, req: Request, row: int, fed: int) -> None:
        """Record ``req``'s part of the batch."""
        self.rows[req] = (row, fed)

    def row(self, req: Request) -> int:
        """The batch row of ``req``'s logits, or -1."""
        return self.rows.get(req, (-1, 0))[0]

    def fed(self, req: Request) -> int:
        """Tokens of ``req`` in this decode."""
        return self.rows.get(req, (-1, 0))[1]


@dataclass(eq=False)
class Request:
    """One unit of work for the loop (internal to the engine)."""

    kind: str  # "score" | "generate"
    handle: RequestHandle
    prefix_key: tuple
    prefix_tokens: list[int]
    body_tokens: list[int]
    choices: list[list[int]] = field(default_factory=list)
    params: GenerationParams = field(default_factory=GenerationParams)
    state: RequestState = RequestState.WAITING
    slot: int = -1
    # The prompt (prefix + body) never changes; ``num_computed`` of its tokens have KV cells in
    # the request's slot (reused, copied from a cached prefix, or evaluated), and prefill feeds
    # the rest. ``n_past`` is the position of the next token fed (prompt, then generated).
    prompt: tuple[int, ...] = ()
    num_computed: int = 0
    n_past: int = 0
    cached_tokens: int = 0
    ctx_base: int = 0
    pending_prefix: int = -1  # prefix sequence to tag once the prefix is evaluated
    # generation
    last_token: int = -1
    n_generated: int = 0
    text: str = ""
    n_emitted: int = 0
    decoder: codecs.IncrementalDecoder | None = None
    rng: np.random.Generator | None = None
    # scoring
    choice_lp: list[float] = field(default_factory=list)
    branches: list[tuple[int, int, list[int]]] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.prompt = tuple(self.prefix_tokens) + tuple(self.body_tokens)
