"""A request's state inside the llama.cpp engine: what it is, where it is in its life, and its
part of one step. The transitions are made by the engine loop (table in ``engine_loop``)."""

from __future__ import annotations

import codecs
import enum
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from allinone.backends.base import FinishReason, GenerationParams, RequestHandle, TokenLogprob
from allinone.backends.llama_cpp.grammar import TokenMatcher
from allinone.backends.llama_cpp.sampling import REPEAT_LAST_N


class RequestState(enum.Enum):
    """Where a request is in its life; the ``FINISHED_*`` states say how it ended (vLLM's
    ``RequestStatus``). See the transition table in the module docstring."""

    WAITING = "waiting"  # queued, holds no sequence
    PREFILL = "prefill"  # its prompt's tokens are being evaluated in its slot
    DECODE = "decode"  # generating: one token a step
    SCORE_BRANCHES = "score_branches"  # branch suffixes and multi-token labels, on scratch seqs
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
class Feed:
    """Tokens fed into one scratch sequence, and the label tokens read at some of them.

    ``reads[j]`` lists (label index, token id): the log-probability of that token at the
    position after ``tokens[j]`` is added to the label's score."""

    seq: int
    pos: int  # position of tokens[0]
    tokens: tuple[int, ...]
    reads: dict[int, list[tuple[int, int]]]
    done: int = 0  # tokens fed so far
    rows: list[tuple[int, int]] = field(default_factory=list)  # (offset, batch row), this step
    step_fed: int = 0  # tokens fed in this step (taken back if the decode fails)

    @property
    def complete(self) -> bool:
        """Every token fed and every read taken."""
        return self.done == len(self.tokens) and not self.rows


@dataclass(eq=False)
class Branch:
    """One question of a scoring request: a suffix evaluated after the shared body (on a copy of
    the body's cells) and a label set whose log-probabilities are read after it.

    Labels of one token are read where the suffix ends (or the body, for an empty suffix);
    longer ones continue on scratch sequences, one per distinct label head (all tokens but the
    last), so the labels ``AB`` and ``AC`` of tokens ``A B`` / ``A C`` share one."""

    suffix: tuple[int, ...]
    labels: list[list[int]]
    lp: list[float] = field(default_factory=list)
    seqs: list[int] = field(default_factory=list)  # scratch sequences it holds
    feeds: list[Feed] = field(default_factory=list)
    started: bool = False
    in_heads: bool = False  # the suffix is done; the label heads are being fed
    finished: bool = False

    def __post_init__(self) -> None:
        self.lp = [0.0] * len(self.labels)

    def heads(self) -> list[tuple[tuple[int, ...], list[int]]]:
        """(head tokens, indices of the labels of several tokens that start with it)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, toks in enumerate(self.labels):
            if len(toks) > 1:
                groups.setdefault(tuple(toks[:-1]), []).append(i)
        return list(groups.items())

    @property
    def seqs_needed(self) -> int:
        """Scratch sequences it holds at once: one per head (the suffix shares the first)."""
        return max(1 if self.suffix else 0, len(self.heads()))

    @property
    def cells_needed(self) -> int:
        """KV cells its scratch sequences add to the body's."""
        return len(self.suffix) + sum(len(h) for h, _ in self.heads())

    def first_reads(self) -> list[tuple[int, int]]:
        """(label index, first token) for every label."""
        return [(i, toks[0]) for i, toks in enumerate(self.labels)]

    def head_feeds(self, pos: int) -> list[Feed]:
        """Feeds for the labels of several tokens, on ``self.seqs`` in order, from ``pos``."""
        out = []
        for k, (head, members) in enumerate(self.heads()):
            reads = {j: [(i, self.labels[i][j + 1]) for i in members] for j in range(len(head))}
            out.append(Feed(self.seqs[k], pos, head, reads))
        return out


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
    stop_sequence: str | None = None  # the stop string that ended the reply
    decoder: codecs.IncrementalDecoder | None = None
    rng: np.random.Generator | None = None
    matcher: TokenMatcher | None = None  # the grammar's parser state, when constrained
    counts: dict[int, int] = field(default_factory=dict)  # token -> times generated (penalties)
    # the repetition penalty's window: the last REPEAT_LAST_N tokens of prompt and reply
    recent: deque[int] = field(default_factory=lambda: deque(maxlen=REPEAT_LAST_N))
    # Log-probabilities: one entry per generated token, with the UTF-8 byte offset in the
    # reply where its piece ends; only the entries within the text sent so far are sent
    # (``logprobs_sent``), so they always spell exactly the returned text.
    logprobs: list[TokenLogprob] = field(default_factory=list)
    logprob_ends: list[int] = field(default_factory=list)
    n_bytes: int = 0  # bytes of every generated token's piece
    n_emitted_bytes: int = 0  # UTF-8 bytes of text[:n_emitted]
    n_logprobs_emitted: int = 0  # entries of ``logprobs`` dealt with (sent, cut or dropped)
    logprobs_sent: list[TokenLogprob] = field(default_factory=list)
    # scoring: one branch per question (a classification is one branch with no suffix)
    branches: list[Branch] = field(default_factory=list)
    branch_cells: int = 0  # KV cells the running branches' scratch sequences hold
    nested_result: bool = False  # result: one list per branch (else the only branch's list)
    # n > 1: the other choices, each with its own slot and handle; they take a copy of this
    # request's prompt cells (``seq_cp``) when its prompt is done, so it is evaluated once
    forks: list[Request] = field(default_factory=list)
    submitted_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.prompt = tuple(self.prefix_tokens) + tuple(self.body_tokens)
        self.recent.extend(self.prompt[-REPEAT_LAST_N:])
