"""The engine loop: one thread owns the llama.cpp context and runs every request in shared steps.

Each step is one ``llama_decode`` over all active sequences: one token for each generating
sequence, the branch tokens of multi-token labels, and prompt chunks of newly admitted requests
(two decodes when a big prompt chunk meets generating sequences: see ``_MIXED_STEP_SPLIT``).
Requests join and leave between steps (continuous batching).

Sequence ids are split into three pools: request slots (``parallel``), cached task prefixes, and
scratch branches for scoring labels that take more than one token. A task's constant prefix is
evaluated once, by the first request that needs it (in its own slot, within a shared step), then
tagged with a prefix sequence and shared with each later request by ``seq_cp``, so a request
pays only for its own tokens.

A finished chat leaves its cells in its slot (``reuse_slots``): when the next request's tokens
start with what a free slot holds, that slot is chosen, cut back to the shared part and only the
rest is evaluated, so the next turn of a conversation costs its new tokens only. Classification
and seeded sampling never reuse beyond the task prefix, so their results do not depend on what
ran before.

Finished chats whose slot goes to another request are saved to host memory first
(``PromptCache``, ``prompt_cache_bytes``) and restored when the conversation comes back, as
llama-server's ``--cache-ram`` does.

A request's life (``RequestState``), each transition made by one method:

| from | to | method |
|---|---|---|
| WAITING | PREFILL | ``_start_request``: a slot, reused or cached cells, the rest to evaluate |
| WAITING | FINISHED_CANCELLED | ``_start_request``: cancelled while it waited |
| PREFILL | DECODE | ``_on_prompt_done``: a generation's first token is sampled |
| PREFILL | SCORE_BRANCHES | ``_on_prompt_done``: labels of several tokens go to scratch branches |
| PREFILL, SCORE_BRANCHES | FINISHED_STOPPED | ``_on_prompt_done`` / ``_on_branches``: scores |
| DECODE | FINISHED_STOPPED / _LENGTH | ``_on_token``: end of generation, stop string, caps |
| any live state | FINISHED_CANCELLED | ``_step``: its handle was cancelled (client gone, timeout) |
| any live state | FINISHED_ERROR | ``_fail_request``, ``_decode_failed``, ``_fail_all`` |

Every terminal transition goes through ``_end``, which frees the request's sequences. Each step is
planned (``_plan``: which tokens of which request go into the batch, a ``StepPlan``), executed
(``_decode``) and applied (``_update``, one request at a time: a request that raises fails alone).
"""

from __future__ import annotations

import codecs
import enum
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from allinone.backends.base import (
    BackendError,
    EngineDeadError,
    EngineOverloadedError,
    Finished,
    FinishReason,
    GenerationParams,
    RequestHandle,
    Usage,
)
from allinone.backends.kv_layout import KVLayout
from allinone.backends.llama_cpp.prompt_cache import PromptCache
from allinone.backends.llama_cpp.runtime import LlamaRuntime
from allinone.backends.llama_cpp.sampling import log_softmax, sample_token

log = logging.getLogger(__name__)

# A step that mixes generating sequences with prompt tokens is run as two decodes (the
# generating tokens, then the prompt chunks) once it would reach this many tokens. From 64 rows
# llama.cpp's CPU flash attention takes another path, which for a batch of several sequences in
# the unified KV cache scans every sequence's cells for every row: measured here with 7 chats at
# 900 tokens each, a 56-token prompt plus their 7 tokens took 398 ms in one decode, a 57-token
# prompt 970 ms in one and 446 ms in two.
_MIXED_STEP_SPLIT = 64

# A slot's chat cells go to host memory when at least this many tokens would be lost (saving
# costs a copy of every cell of the sequence; a short tail is cheaper to evaluate again).
_SAVE_MIN_TOKENS = 32
# A saved conversation is restored when it keeps at least this many more tokens than the best
# slot does (restoring copies all its cells back: ~0.5 ms for a chat of a few hundred tokens
# here, against ~4.5 ms for each token evaluated).
_RESTORE_MIN_GAIN = 16


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


class EngineLoop:
    """The step loop. ``submit`` is thread-safe; everything else runs on the loop's thread."""

    def __init__(
        self,
        rt: LlamaRuntime,
        parallel: int,
        ctx_per_seq: int,
        prefix_cache_size: int,
        prefix_cache_tokens: int,
        max_choices: int,
        max_queue: int,
        seed: int = 0,
        reuse_slots: bool = True,
        prompt_cache_bytes: int = 0,
    ) -> None:
        self.rt = rt
        self.parallel = parallel
        self.ctx_per_seq = ctx_per_seq
        self.max_choices = max_choices
        self.prefix_cache_tokens = prefix_cache_tokens
        self.prefix_cache_size = prefix_cache_size
        self.seed = seed
        self.reuse_slots = reuse_slots
        self._ram = PromptCache(prompt_cache_bytes) if reuse_slots and prompt_cache_bytes else None
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
        self._free_slots = list(range(parallel))  # least recently freed first
        # the tokens each slot's cells hold, position by position
        self._slot_tokens: dict[int, list[int]] = {s: [] for s in range(parallel)}
        layout = KVLayout(
            parallel, ctx_per_seq, prefix_cache_size, prefix_cache_tokens, max_choices
        )
        self._free_prefix_seqs = list(layout.prefix_seqs)
        self._free_scratch = list(layout.scratch_seqs)
        # prefix key -> (sequence id, token count); least recently used first
        self._prefixes: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self._prefix_tokens_used = 0
        self._active: list[Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="allinone-engine", daemon=True)
        self.alive = False
        self.crash: str | None = None  # why the loop died, if it did
        self.counters = {
            "steps": 0,
            "split_steps": 0,
            "prompt_tokens": 0,
            "generated_tokens": 0,
            "prefix_hits": 0,
            "prefix_misses": 0,
            "reused_tokens": 0,
            "restored_tokens": 0,
            "prompt_cache_saves": 0,
            "finished": 0,
            "cancelled": 0,
            "failed": 0,
        }

    # -- caller side -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread."""
        self.alive = True
        self._thread.start()

    def submit(self, req: Request) -> RequestHandle:
        """Queue a request; EngineOverloadedError when the wait queue is full."""
        if not self.alive:
            if self.crash:
                raise EngineDeadError(f"the engine loop has stopped ({self.crash})")
            raise BackendError("the engine is not running")
        try:
            self._queue.put_nowait(req)
        except queue.Full:
            raise EngineOverloadedError(
                f"the engine's wait queue is full ({self._queue.maxsize} requests); retry later"
            ) from None
        return req.handle

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop; requests still queued or running fail."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        self.alive = False

    def check_invariants(self) -> None:
        """Assert the sequence pools' bookkeeping matches llama.cpp's cells (tests call this
        when the engine is idle). AssertionError names the first broken rule."""
        assert not self._active and self._queue.empty(), "the engine is not idle"
        assert sorted(self._free_slots) == list(range(self.parallel)), "a slot was not freed"
        for slot in range(self.parallel):
            # a free slot holds only what the loop knows it keeps for the next chat turn
            held = len(self._slot_tokens[slot])
            assert self.rt.seq_pos_max(slot) == held - 1, f"slot {slot}: cells != tokens held"
        for seq in self._free_scratch:
            assert self.rt.seq_pos_max(seq) == -1, f"scratch sequence {seq} holds cells"
        assert len(self._free_scratch) == self.parallel * self.max_choices, "scratch leaked"
        cached = sum(n for _, n in self._prefixes.values())
        assert self._prefix_tokens_used == cached, "prefix budget != cached prefixes' tokens"
        n_prefix_seqs = len(self._free_prefix_seqs) + len(self._prefixes)
        assert n_prefix_seqs == self.prefix_cache_size, "a prefix sequence leaked"

    def stats(self) -> dict[str, int]:
        """Queue depth, active sequences and cumulative counters."""
        return {
            "queue_depth": self._queue.qsize(),
            "active": len(self._active),
            "cached_prefixes": len(self._prefixes),
            "prompt_cache_entries": len(self._ram) if self._ram is not None else 0,
            "prompt_cache_bytes": self._ram.bytes if self._ram is not None else 0,
            **self.counters,
        }

    # -- loop --------------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._admit()
                if not self._active:
                    try:
                        req = self._queue.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self._start(req)
                    continue
                self._step()
        except Exception as exc:  # the loop must never die silently
            log.exception("engine loop crashed")
            self.crash = f"{type(exc).__name__}: {exc}"
            self.alive = False
            self._fail_all(EngineDeadError(f"the engine loop crashed ({self.crash})"))
            return
        self._fail_all(BackendError("the engine stopped"))
        self.alive = False

    def _fail_all(self, exc: BaseException) -> None:
        for req in list(self._active):
            self._end(req, error=exc)
        while True:
            try:
                self._queue.get_nowait().handle.fail(exc)
            except queue.Empty:
                break

    def _admit(self) -> None:
        while self._free_slots:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            self._start(req)

    def _start(self, req: Request) -> None:
        try:
            self._start_request(req)
        except Exception as exc:  # e.g. a restore that failed: this request only
            self._fail_request(req, exc)

    def _start_request(self, req: Request) -> None:
        if req.handle.cancelled.is_set():
            self.counters["cancelled"] += 1
            req.handle.finish(Finished("cancelled", Usage()))
            return
        if req.kind == "generate" and req.params.seed is not None:
            # Where a sequence's cells sit in the KV buffer changes the attention's rounding, so
            # a seeded request starts from the layout it would find on an idle engine.
            self._drop_idle_cells()
        n_prefix = len(req.prefix_tokens)
        req.slot, common = self._pick_slot(req)
        if self._ram is not None and self._reuses(req):
            common = self._restore(req, common)
        held = self._slot_tokens[req.slot]
        if common > n_prefix:
            self._save(req.slot, keep=common)
        if common > n_prefix and self.rt.seq_truncate(req.slot, common):
            # The slot still holds the start of this conversation: evaluate only the rest.
            del held[common:]
            req.num_computed = req.n_past = req.cached_tokens = common
            req.ctx_base = n_prefix
            self.counters["reused_tokens"] += common
        else:
            self._save(req.slot)
            self._clear_slot(req.slot)
            prefix_seq, n_cached = self._prefix_for(req)
            if prefix_seq >= 0:
                self.rt.seq_cp(prefix_seq, req.slot)
                held.extend(req.prefix_tokens)
                req.num_computed = req.n_past = req.cached_tokens = req.ctx_base = n_cached
            else:  # a miss: evaluate the prefix as part of the request
                req.num_computed = req.n_past = 0
                if req.pending_prefix >= 0:
                    req.ctx_base = len(req.prefix_tokens)
        if req.kind == "generate":
            req.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            seed = req.params.seed if req.params.seed is not None else self.seed
            req.rng = np.random.default_rng(seed)
        req.state = RequestState.PREFILL
        self._active.append(req)

    def _pick_slot(self, req: Request) -> tuple[int, int]:
        """Take a free slot: the one whose cells share the longest start with this chat's
        tokens, else the least recently used; returns (slot, tokens it can keep)."""
        best, best_n = 0, 0
        if self._reuses(req):
            full = req.prompt
            limit = len(full) - 1  # the last token is always fed again: it gives the logits
            for i, slot in enumerate(self._free_slots):
                held = self._slot_tokens[slot]
                n, top = 0, min(len(held), limit)
                while n < top and held[n] == full[n]:
                    n += 1
                if n > best_n:
                    best, best_n = i, n
        if best_n == 0:  # no match: keep other chats' cells, take an empty slot if there is one
            best = next((i for i, s in enumerate(self._free_slots) if not self._slot_tokens[s]), 0)
        return self._free_slots.pop(best), best_n

    def _save(self, slot: int, keep: int = 0) -> None:
        """Copy a free slot's chat cells to host memory before all but ``keep`` of them go."""
        held = self._slot_tokens[slot]
        if self._ram is None or len(held) - keep < _SAVE_MIN_TOKENS or self._ram.holds(held):
            return
        if self._ram.put(held, self.rt.seq_save(slot)):
            self.counters["prompt_cache_saves"] += 1

    def _restore(self, req: Request, common: int) -> int:
        """Put back the saved conversation that shares the most with this chat, when it beats
        the ``common`` tokens the picked slot keeps; returns the tokens the slot now shares."""
        ram = self._ram
        assert ram is not None  # only called with the prompt cache on
        full = list(req.prompt)
        key, n = ram.match(full, len(full) - 1)
        if key < 0 or n < common + _RESTORE_MIN_GAIN:
            return common
        # Take the entry before saving what the slot holds: that save may evict it.
        entry = ram.get(key)
        self._save(req.slot)  # the slot may hold another conversation
        held = self._slot_tokens[req.slot]
        held.clear()
        if not self.rt.seq_restore(req.slot, entry.data):
            log.warning("no KV cells to restore a saved chat into; evaluating it again")
            return 0
        held.extend(entry.tokens.tolist())
        self.counters["restored_tokens"] += n
        return n

    def _reuses(self, req: Request) -> bool:
        """Whether a request may start from, and leave behind, cells of earlier turns.

        A classification or a request with a seed wants the exact result it got before:
        evaluating only part of the prompt changes the batch shape, which can move logits by
        rounding (see Limits in the README).
        """
        return self.reuse_slots and req.kind == "generate" and req.params.seed is None

    def _decode(self) -> int:
        """Decode the batch; when the KV cache is full (rc 1, nothing applied), free the cells
        that finished chats left in idle slots and try once more."""
        rc = self.rt.decode()
        if rc == 1 and self._drop_idle_cells():
            rc = self.rt.decode()
        return rc

    def _drop_idle_cells(self) -> bool:
        """Free the cells that finished requests left in free slots; True if any were held."""
        dropped = False
        for slot in self._free_slots:
            if self._slot_tokens[slot]:
                self._save(slot)
                self._clear_slot(slot)
                dropped = True
        return dropped

    def _clear_slot(self, slot: int) -> None:
        """Remove a slot's cells and forget the tokens it held."""
        self.rt.seq_rm(slot)
        self._slot_tokens[slot].clear()

    def _prefix_for(self, req: Request) -> tuple[int, int]:
        """The sequence holding this request's prefix: (sequence, tokens) on a hit, else
        (-1, 0). On a miss with room in the cache, a prefix sequence is reserved
        (``req.pending_prefix``): the request evaluates its prefix in its own slot, in a step
        shared with everyone else, and the prefix's cells are then tagged with that sequence
        (``_register_prefix``)."""
        n = len(req.prefix_tokens)
        if n == 0:
            return -1, 0
        hit = self._prefixes.get(req.prefix_key)
        if hit is not None:
            self._prefixes.move_to_end(req.prefix_key)
            self.counters["prefix_hits"] += 1
            return hit
        self.counters["prefix_misses"] += 1
        if n > self.prefix_cache_tokens:
            return -1, 0
        while self._prefixes and (
            not self._free_prefix_seqs or self._prefix_tokens_used + n > self.prefix_cache_tokens
        ):
            _, (old_seq, old_n) = self._prefixes.popitem(last=False)
            self.rt.seq_rm(old_seq)  # requests that copied it keep their cells
            self._free_prefix_seqs.append(old_seq)
            self._prefix_tokens_used -= old_n
        # Every prefix sequence may be reserved by requests still evaluating theirs.
        if self._free_prefix_seqs and self._prefix_tokens_used + n <= self.prefix_cache_tokens:
            req.pending_prefix = self._free_prefix_seqs.pop()
            self._prefix_tokens_used += n
        return -1, 0

    def _register_prefix(self, req: Request) -> None:
        """The request's prefix is evaluated: share its cells with the reserved sequence."""
        seq, n, req.pending_prefix = req.pending_prefix, len(req.prefix_tokens), -1
        if req.prefix_key in self._prefixes:  # another request got there first
            self._release_prefix(seq, n)
            return
        self.rt.seq_cp(req.slot, seq, 0, n)
        self._prefixes[req.prefix_key] = (seq, n)

    def _release_prefix(self, seq: int, n: int) -> None:
        self.rt.seq_rm(seq)
        self._free_prefix_seqs.append(seq)
        self._prefix_tokens_used -= n

    def _step(self) -> None:
        # Cancelled requests leave before the step so their sequences are free for others.
        for req in list(self._active):
            if req.handle.cancelled.is_set():
                self._end(req, reason="cancelled")
        if not self._active:
            return
        stepping = sum(
            r.state in (RequestState.DECODE, RequestState.SCORE_BRANCHES) for r in self._active
        )
        prompt = sum(
            len(r.prompt) - r.num_computed for r in self._active if r.state is RequestState.PREFILL
        )
        if stepping and stepping + min(prompt, self.rt.shape.n_batch) >= _MIXED_STEP_SPLIT:
            # See _MIXED_STEP_SPLIT: two decodes cost less than one mixed one of this size.
            self.counters["split_steps"] += 1
            self._decode_step(prefill=False)
            self._decode_step(generate=False)
        else:
            self._decode_step()

    def _decode_step(self, generate: bool = True, prefill: bool = True) -> None:
        """One llama_decode over the generating sequences' next tokens and label branches
        (``generate``) and the prompt chunks of requests being admitted (``prefill``):
        plan the batch, execute it, update each request from its rows."""
        plan = self._plan(generate, prefill)
        if self.rt.batch_size == 0:
            return
        rc = self._decode()
        self.counters["steps"] += 1
        if rc != 0:
            self._decode_failed(rc, plan)
            return
        for req in list(self._active):
            try:
                self._update(req, plan.row(req))
            except Exception as exc:  # one request's failure is that request's alone
                self._fail_request(req, exc)

    def _plan(self, generate: bool, prefill: bool) -> StepPlan:
        """Fill the batch: generating tokens first, then label branches, then prompt chunks
        up to ``n_batch`` tokens in all."""
        rt = self.rt
        rt.batch_clear()
        plan = StepPlan()
        budget = rt.shape.n_batch
        for req in self._active:
            if generate and req.state is RequestState.DECODE:
                plan.add(req, rt.batch_add(req.last_token, req.n_past, req.slot, True), 1)
                self._slot_tokens[req.slot].append(req.last_token)
                req.n_past += 1
                budget -= 1
        for req in self._active:
            if generate and req.state is RequestState.SCORE_BRANCHES:
                need = sum(len(toks) for _, _, toks in req.branches)
                if need > budget:  # wait for a step with room; rare (labels are short)
                    continue
                plan.add(req, rt.batch_size, 0)
                for seq, _, toks in req.branches:
                    for j, tok in enumerate(toks):
                        rt.batch_add(tok, req.n_past + j, seq, True)
                budget -= need
        for req in self._active:
            if not prefill or req.state is not RequestState.PREFILL or budget <= 0:
                continue
            end = req.num_computed + budget
            if req.pending_prefix >= 0 and req.num_computed < len(req.prefix_tokens):
                # The prefix ends a chunk, so that its cells and every later request's body
                # are evaluated as they are on a cache hit (same results, bit for bit).
                end = min(end, len(req.prefix_tokens))
            chunk = req.prompt[req.num_computed : end]
            last = req.num_computed + len(chunk) == len(req.prompt)
            for j, tok in enumerate(chunk):
                i = rt.batch_add(tok, req.n_past + j, req.slot, last and j == len(chunk) - 1)
            plan.add(req, i if last else -1, len(chunk))
            self._slot_tokens[req.slot].extend(chunk)
            req.n_past += len(chunk)
            req.num_computed += len(chunk)
            budget -= len(chunk)
            self.counters["prompt_tokens"] += len(chunk)
        return plan

    def _update(self, req: Request, row: int) -> None:
        """Take one request's results of the decode that just ran (``row``: its logits' batch
        row, -1 when it has none this step)."""
        if req.pending_prefix >= 0 and req.num_computed >= len(req.prefix_tokens):
            self._register_prefix(req)
        if row < 0:
            return
        if req.state is RequestState.DECODE:
            self._on_token(req, self.rt.logits(row))
        elif req.state is RequestState.SCORE_BRANCHES:
            self._on_branches(req, row)
        elif req.state is RequestState.PREFILL:
            self._on_prompt_done(req, self.rt.logits(row))

    def _fail_request(self, req: Request, exc: Exception) -> None:
        """End one request with an error the client sees; the loop and its neighbours go on."""
        log.exception("request failed in the engine; the others continue")
        if req.state.is_finished:
            return
        self._end(req, error=BackendError(f"the engine could not run this request: {exc}"))

    def _decode_failed(self, rc: int, plan: StepPlan) -> None:
        # rc 1: no KV slot, and llama.cpp applied nothing. Fail the newest prefilling request to
        # make room and take the step back for the others, who run again next step. Other codes
        # are fatal for every request in the batch, whose cells may be half-written.
        victims = list(self._active)
        if rc == 1:
            prefilling = [r for r in self._active if r.state is RequestState.PREFILL]
            victims = prefilling[-1:] or victims
            for req in self._active:
                fed = plan.fed(req)
                if req in victims or not fed:
                    continue
                req.n_past -= fed
                if req.state is RequestState.PREFILL:
                    req.num_computed -= fed
                del self._slot_tokens[req.slot][-fed:]
        for req in victims:
            self._end(
                req, error=BackendError(f"llama_decode failed (code {rc}); retry the request")
            )

    def _on_prompt_done(self, req: Request, logits: np.ndarray) -> None:
        if req.kind == "generate":
            req.state = RequestState.DECODE
            self._on_token(req, logits)
            return
        lp = log_softmax(logits)
        req.choice_lp = [float(lp[c[0]]) for c in req.choices]
        multi = [(ci, c) for ci, c in enumerate(req.choices) if len(c) > 1]
        if not multi:
            self._end(req, reason="stop", result=req.choice_lp)
            return
        for ci, c in multi:
            seq = self._free_scratch.pop()
            self.rt.seq_cp(req.slot, seq)
            # Feed all but the last token; each position predicts the next token of the label.
            req.branches.append((seq, ci, c[:-1]))
        req.state = RequestState.SCORE_BRANCHES

    def _on_branches(self, req: Request, start: int) -> None:
        idx = start
        for _, ci, toks in req.branches:
            full = req.choices[ci]
            for j in range(len(toks)):
                lp = log_softmax(self.rt.logits(idx + j))
                req.choice_lp[ci] += float(lp[full[j + 1]])
            idx += len(toks)
        self._end(req, reason="stop", result=req.choice_lp)

    def _on_token(self, req: Request, logits: np.ndarray) -> None:
        p = req.params
        assert req.rng is not None and req.decoder is not None  # set when generation starts
        tok = sample_token(logits, p, req.rng)
        if self.rt.is_eog(tok):
            self._end(req, reason="stop")
            return
        req.n_generated += 1
        self.counters["generated_tokens"] += 1
        req.last_token = tok
        req.text += req.decoder.decode(self.rt.piece(tok))
        for s in p.stop:
            at = req.text.find(s, max(0, req.n_emitted - len(s)))
            if at >= 0:
                req.text = req.text[:at]
                self._end(req, reason="stop")
                return
        if p.max_chars is not None and len(req.text) >= p.max_chars:
            req.text = req.text[: p.max_chars]
            self._end(req, reason="length")
            return
        if req.n_generated >= p.max_tokens or req.n_past + 1 >= self.ctx_limit(req):
            self._end(req, reason="length")
            return
        # Hold back a tail that could be the start of a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        upto = len(req.text) - hold
        if upto > req.n_emitted:
            req.handle.emit_text(req.text[req.n_emitted : upto])
            req.n_emitted = upto

    def ctx_limit(self, req: Request) -> int:
        """Last position a request may reach: its cached prefix plus its own context share."""
        return req.ctx_base + self.ctx_per_seq

    def _end(
        self,
        req: Request,
        reason: FinishReason = "stop",
        result: object = None,
        error: BaseException | None = None,
    ) -> None:
        for seq, _, _ in req.branches:
            self.rt.seq_rm(seq)
            self._free_scratch.append(seq)
        req.branches = []
        if req.pending_prefix >= 0:
            self._release_prefix(req.pending_prefix, len(req.prefix_tokens))
            req.pending_prefix = -1
        if req.slot >= 0:
            if error is not None or not self._reuses(req):
                # Failed requests may have half-written cells.
                self._clear_slot(req.slot)
            self._free_slots.append(req.slot)
            req.slot = -1
        if req in self._active:
            self._active.remove(req)
        req.state = (
            RequestState.FINISHED_ERROR if error is not None else RequestState.finished(reason)
        )
        if error is not None:
            self.counters["failed"] += 1
            req.handle.fail(error)
            return
        if req.kind == "generate" and req.decoder is not None:
            req.text += req.decoder.decode(b"", final=True)
            if req.params.max_chars is not None:
                req.text = req.text[: req.params.max_chars]
            if len(req.text) > req.n_emitted and reason != "cancelled":
                req.handle.emit_text(req.text[req.n_emitted :])
                req.n_emitted = len(req.text)
        self.counters["cancelled" if reason == "cancelled" else "finished"] += 1
        usage = Usage(
            prompt_tokens=len(req.prompt),
            completion_tokens=req.n_generated,
            cached_tokens=req.cached_tokens,
        )
        if req.kind == "generate":
            result = req.text  # the whole reply, for callers that do not stream
        req.handle.finish(Finished(reason, usage, result))
