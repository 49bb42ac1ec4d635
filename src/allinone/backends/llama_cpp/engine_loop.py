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

A finished chat's cells are copied to host memory (``PromptCache``, ``prompt_cache_bytes``, as
llama-server's ``--cache-ram``) and leave the KV cache (``SequencePools.park``: idle cells would
slow every step); when the next request's tokens start with a saved chat's, the chat is copied
back into a free slot, cut back to the shared part, and only the rest is evaluated, so the next
turn of a conversation costs its new tokens only (``reuse_slots``). With the host-memory cache
off, or for a chat too big for it, the cells wait in the slot instead and are reused from there.
Classification and seeded sampling never reuse beyond the task prefix, so their results do not
depend on what ran before.

A request's life (``RequestState``), each transition made by one method:

| from | to | method |
|---|---|---|
| WAITING | PREFILL | ``_start_request``: a slot, reused or cached cells, the rest to evaluate |
| WAITING | FINISHED_CANCELLED | ``_start_request``: cancelled while it waited |
| PREFILL | DECODE | ``_on_prompt_done``: a generation's first token is sampled |
| WAITING (a fork) | DECODE | ``_on_prompt_done`` of its parent: prompt cells copied |
| PREFILL | SCORE_BRANCHES | ``_on_prompt_done``: labels of several tokens go to scratch branches |
| PREFILL, SCORE_BRANCHES | FINISHED_STOPPED | ``_on_prompt_done`` / ``_on_branches``: scores |
| DECODE | FINISHED_STOPPED / _LENGTH | ``_on_token``: end of generation, stop string, caps |
| any live state | FINISHED_CANCELLED | ``_step``: its handle was cancelled (client gone, timeout) |
| any live state | FINISHED_ERROR | ``_fail_request``, ``_decode_failed``, ``_fail_all`` |

Every terminal transition goes through ``_end``, which frees the request's sequences. Each step is
planned (``_plan``: which tokens of which request go into the batch, a ``StepPlan``), executed
(``_decode``) and applied (``_update``), one request at a time in starting, planning and
applying: a request that raises there fails alone, and the loop and its neighbours go on. A
request with no prompt tokens is refused at ``submit``; every other request is started with at
least its last prompt token left to evaluate, whose logits it reads.
"""

from __future__ import annotations

import codecs
import dataclasses
import logging
import queue
import threading

import numpy as np

from allinone.backends.base import (
    BackendError,
    EngineDeadError,
    EngineOverloadedError,
    Finished,
    FinishReason,
    RequestHandle,
    Usage,
)
from allinone.backends.kv_layout import KVLayout
from allinone.backends.llama_cpp.grammar import GrammarDeadEnd
from allinone.backends.llama_cpp.prompt_cache import PromptCache
from allinone.backends.llama_cpp.request import Branch, Feed, Request, RequestState, StepPlan
from allinone.backends.llama_cpp.runtime import LlamaRuntime
from allinone.backends.llama_cpp.sampling import (
    log_softmax,
    process_logits,
    sample_token,
    token_logprob,
)
from allinone.backends.llama_cpp.sequences import SequencePools
from allinone.serving.errors import InputError

log = logging.getLogger(__name__)

# A step that mixes generating sequences with prompt tokens is run as two decodes (the
# generating tokens, then the prompt chunks) once it would reach this many tokens. From 64 rows
# llama.cpp's CPU flash attention takes another path, which for a batch of several sequences in
# the unified KV cache scans every sequence's cells for every row: measured here with 7 chats at
# 900 tokens each, a 56-token prompt plus their 7 tokens took 398 ms in one decode, a 57-token
# prompt 970 ms in one and 446 ms in two.
_MIXED_STEP_SPLIT = 64


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
        seed: int | None = None,
        reuse_slots: bool = True,
        prompt_cache_bytes: int = 0,
    ) -> None:
        self.rt = rt
        self.parallel = parallel
        self.ctx_per_seq = ctx_per_seq
        self.seed = seed
        self.reuse_slots = reuse_slots
        self._queue: queue.Queue[Request] = queue.Queue(maxsize=max_queue)
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
        layout = KVLayout(
            parallel, ctx_per_seq, prefix_cache_size, prefix_cache_tokens, max_choices
        )
        ram = PromptCache(prompt_cache_bytes) if reuse_slots and prompt_cache_bytes else None
        self.seqs = SequencePools(rt, layout, ram, self.counters)
        self._active: list[Request] = []
        self._held: Request | None = None  # taken from the queue, waiting for enough slots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="allinone-engine", daemon=True)
        self.alive = False
        self.crash: str | None = None  # why the loop died, if it did

    # -- caller side -------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread."""
        self.alive = True
        self._thread.start()

    def submit(self, req: Request) -> RequestHandle:
        """Queue a request; EngineOverloadedError when the wait queue is full, InputError
        (``prompt``) for a request with no prompt tokens (there would be no logits to read)."""
        if not req.prompt:
            raise InputError("the prompt has no tokens; send some text", "prompt")
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
        """Assert the engine is idle and its sequence pools match llama.cpp's cells (tests call
        this between requests). AssertionError names the first broken rule."""
        idle = not self._active and self._queue.empty() and self._held is None
        assert idle, "the engine is not idle"
        self.seqs.check_invariants()

    def stats(self) -> dict[str, int]:
        """Queue depth, active sequences and cumulative counters."""
        return {
            "queue_depth": self._queue.qsize() + (self._held is not None),
            "active": len(self._active),
            "cached_prefixes": len(self.seqs.prefixes),
            "prompt_cache_entries": len(self.seqs.ram) if self.seqs.ram is not None else 0,
            "prompt_cache_bytes": self.seqs.ram.bytes if self.seqs.ram is not None else 0,
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
        if self._held is not None:
            self._end(self._held, error=exc)
            self._held = None
        while True:
            try:
                self._queue.get_nowait().handle.fail(exc)
            except queue.Empty:
                break

    def _admit(self) -> None:
        while self.seqs.free_slots:
            req = self._held
            if req is None:
                try:
                    req = self._queue.get_nowait()
                except queue.Empty:
                    return
            # A request with forks (n > 1) starts when it can have all its slots at once (the
            # backend refuses n above ``parallel``); the queue behind it waits, in order.
            if len(req.forks) >= len(self.seqs.free_slots):
                self._held = req
                return
            self._held = None
            self._start(req)

    def _start(self, req: Request) -> None:
        try:
            self._start_request(req)
        except Exception as exc:  # e.g. a restore that failed: this request only
            self._fail_request(req, exc)

    def _start_request(self, req: Request) -> None:
        if req.handle.cancelled.is_set():
            self._end(req, reason="cancelled")
            return
        if req.kind == "generate" and req.params.seed is not None:
            # Where a sequence's cells sit in the KV buffer changes the attention's rounding, so
            # a seeded request starts from the layout it would find on an idle engine.
            self.seqs.drop_idle_cells()
        n_prefix = len(req.prefix_tokens)
        req.slot, common = self.seqs.pick_slot(req, self._reuses(req))
        if self.seqs.ram is not None and self._reuses(req):
            common = self.seqs.restore(req, common)
        held = self.seqs.slot_tokens[req.slot]
        if common > n_prefix:
            self.seqs.save(req.slot, keep=common)
        if common > n_prefix and self.rt.seq_truncate(req.slot, common):
            # The slot still holds the start of this conversation: evaluate only the rest.
            del held[common:]
            req.num_computed = req.n_past = req.cached_tokens = common
            req.ctx_base = n_prefix
            self.counters["reused_tokens"] += common
        else:
            self.seqs.save(req.slot)
            self.seqs.clear_slot(req.slot)
            prefix_seq, n_cached = self.seqs.prefix_for(req)
            if prefix_seq >= 0:
                self.rt.seq_cp(prefix_seq, req.slot)
                held.extend(req.prefix_tokens)
                req.num_computed = req.n_past = req.cached_tokens = req.ctx_base = n_cached
            else:  # a miss: evaluate the prefix as part of the request
                req.num_computed = req.n_past = 0
                if req.pending_prefix >= 0:
                    req.ctx_base = len(req.prefix_tokens)
        if req.num_computed >= len(req.prompt):
            # Every prompt token has cells already (the prompt is exactly a cached task prefix):
            # the last one is evaluated again, for the logits of what follows it.
            keep = len(req.prompt) - 1
            if self.rt.seq_truncate(req.slot, keep):
                del held[keep:]
                req.num_computed = req.n_past = keep
                req.cached_tokens = min(req.cached_tokens, keep)
            else:
                self.seqs.clear_slot(req.slot)
                req.num_computed = req.n_past = req.cached_tokens = 0
        for fork in req.forks:  # their slots are reserved now, filled when the prompt is done
            fork.slot = self.seqs.free_slots.pop(0)
            self.seqs.save(fork.slot)
            self.seqs.clear_slot(fork.slot)
        if req.kind == "generate":
            req.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            # Without a seed (the request's, else the operator's ALLINONE_SEED) every request
            # draws a fresh one from the OS: only an explicit seed may repeat a sample.
            seed = req.params.seed if req.params.seed is not None else self.seed
            req.rng = np.random.default_rng(seed)
            if req.params.grammar is not None:
                req.matcher = req.params.grammar.matcher()
        req.state = RequestState.PREFILL
        self._active.append(req)

    def _reuses(self, req: Request) -> bool:
        """Whether a request may start from, and leave behind, cells of earlier turns.

        A classification or a request with a seed wants the exact result it got before:
        evaluating only part of the prompt changes the batch shape, which can move logits by
        rounding (see docs/limits.md).
        """
        return self.reuse_slots and req.kind == "generate" and req.params.seed is None

    def _decode(self) -> int:
        """Decode the batch; when the KV cache is full (rc 1, nothing applied), free the cells
        that finished chats left in idle slots and try once more."""
        rc = self.rt.decode()
        if rc == 1 and self.seqs.drop_idle_cells():
            rc = self.rt.decode()
        return rc

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
        up to ``n_batch`` tokens in all. A request whose planning raises leaves the batch (its
        rows are taken out again) and fails alone, as in ``_update``."""
        rt = self.rt
        rt.batch_clear()
        plan = StepPlan()
        budget = rt.shape.n_batch
        phases = [self._plan_decode, self._plan_branches] if generate else []
        if prefill:
            phases.append(self._plan_prefill)
        for phase in phases:
            for req in list(self._active):
                mark = rt.batch_size
                try:
                    budget -= phase(req, plan, budget)
                except Exception as exc:  # this request only: the others' rows stay
                    rt.batch_truncate(mark)
                    plan.rows.pop(req, None)
                    self._fail_request(req, exc)
        return plan

    def _plan_decode(self, req: Request, plan: StepPlan, budget: int) -> int:
        """A generating request's last sampled token; returns the tokens added."""
        if req.state is not RequestState.DECODE:
            return 0
        plan.add(req, self.rt.batch_add(req.last_token, req.n_past, req.slot, True), 1)
        self.seqs.slot_tokens[req.slot].append(req.last_token)
        req.n_past += 1
        return 1

    def _plan_branches(self, req: Request, plan: StepPlan, budget: int) -> int:
        """A scoring request's branch tokens, up to ``budget``; returns the tokens added."""
        if req.state is not RequestState.SCORE_BRANCHES or budget <= 0:
            return 0
        rt = self.rt
        self._start_branches(req)
        fed = 0
        for br in req.branches:
            for feed in br.feeds if br.started and not br.finished else ():
                n = min(len(feed.tokens) - feed.done, budget - fed)
                for j in range(feed.done, feed.done + n):
                    read = j in feed.reads
                    row = rt.batch_add(feed.tokens[j], feed.pos + j, feed.seq, read)
                    if read:
                        feed.rows.append((j, row))
                feed.done += n
                feed.step_fed = n
                fed += n
        if fed:
            plan.add(req, 0, 0)  # its rows are in its feeds
            self.counters["prompt_tokens"] += fed
        return fed

    def _plan_prefill(self, req: Request, plan: StepPlan, budget: int) -> int:
        """The next chunk of a request's prompt, up to ``budget`` tokens; returns the tokens
        added. BackendError if nothing is left to evaluate (``_start_request`` always leaves
        at least the last prompt token, whose logits the request reads)."""
        if req.state is not RequestState.PREFILL or budget <= 0:
            return 0
        end = req.num_computed + budget
        if req.pending_prefix >= 0 and req.num_computed < len(req.prefix_tokens):
            # The prefix ends a chunk, so that its cells and every later request's body
            # are evaluated as they are on a cache hit (same results, bit for bit).
            end = min(end, len(req.prefix_tokens))
        chunk = req.prompt[req.num_computed : end]
        if not chunk:
            raise BackendError(
                f"no prompt tokens left to evaluate ({req.num_computed} of {len(req.prompt)} "
                "have cells)"
            )
        last = req.num_computed + len(chunk) == len(req.prompt)
        row = -1
        for j, tok in enumerate(chunk):
            row = self.rt.batch_add(tok, req.n_past + j, req.slot, last and j == len(chunk) - 1)
        plan.add(req, row if last else -1, len(chunk))
        self.seqs.slot_tokens[req.slot].extend(chunk)
        req.n_past += len(chunk)
        req.num_computed += len(chunk)
        self.counters["prompt_tokens"] += len(chunk)
        return len(chunk)

    def _update(self, req: Request, row: int) -> None:
        """Take one request's results of the decode that just ran (``row``: its logits' batch
        row, -1 when it has none this step)."""
        if req.pending_prefix >= 0 and req.num_computed >= len(req.prefix_tokens):
            self.seqs.register_prefix(req)
        if row < 0:
            return
        if req.state is RequestState.DECODE:
            self._on_token(req, self.rt.logits(row))
        elif req.state is RequestState.SCORE_BRANCHES:
            self._on_branches(req)
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
                del self.seqs.slot_tokens[req.slot][-fed:]
            for req in self._active:
                if req in victims:
                    continue
                for br in req.branches:  # their branch tokens are fed again next step
                    for feed in br.feeds:
                        feed.done -= feed.step_fed
                        feed.rows, feed.step_fed = [], 0
        for req in victims:
            self._end(
                req, error=BackendError(f"llama_decode failed (code {rc}); retry the request")
            )

    def _on_prompt_done(self, req: Request, logits: np.ndarray) -> None:
        if req.kind == "generate":
            req.state = RequestState.DECODE
            forks, req.forks = req.forks, []
            for fork in forks:
                self._start_fork(req, fork, logits)
            self._on_token(req, logits)
            return
        lp = log_softmax(logits)
        for br in req.branches:
            if not br.suffix:  # read where the body ends; longer labels go on to their heads
                for i, tok in br.first_reads():
                    br.lp[i] = float(lp[tok])
                br.finished = not br.heads()
        req.state = RequestState.SCORE_BRANCHES
        self._end_if_scored(req)

    def _start_fork(self, parent: Request, fork: Request, logits: np.ndarray) -> None:
        """Another choice of ``parent`` (n > 1): its slot takes the parent's prompt cells and
        it samples its first token from the same logits."""
        if fork.handle.cancelled.is_set():
            self._end(fork, reason="cancelled")
            return
        self.rt.seq_cp(parent.slot, fork.slot)
        self.seqs.slot_tokens[fork.slot] = list(self.seqs.slot_tokens[parent.slot])
        fork.num_computed, fork.n_past = parent.num_computed, parent.n_past
        fork.cached_tokens = len(fork.prompt)  # evaluated once, for the parent
        fork.ctx_base = parent.ctx_base
        fork.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        fork.rng = np.random.default_rng(fork.params.seed)
        if fork.params.grammar is not None:
            fork.matcher = fork.params.grammar.matcher()
        fork.state = RequestState.DECODE
        self._active.append(fork)
        try:
            self._on_token(fork, logits)
        except Exception as exc:  # this choice alone
            self._fail_request(fork, exc)

    def _start_branches(self, req: Request) -> None:
        """Give the request's waiting branches, in order, scratch sequences holding a copy of
        its cells, while sequences and its share of KV cells last (``Branch.seqs_needed``,
        ``cells_needed``; the backend checked that each branch fits alone)."""
        room = self.ctx_limit(req) - req.n_past - req.branch_cells
        free = self.seqs.free_scratch
        for br in req.branches:
            if br.started or br.finished:
                continue
            if br.seqs_needed > len(free) or br.cells_needed > room:
                return
            br.started = True
            br.seqs = [free.pop() for _ in range(br.seqs_needed)]
            req.branch_cells += br.cells_needed
            room -= br.cells_needed
            for seq in br.seqs if not br.suffix else br.seqs[:1]:
                self.rt.seq_cp(req.slot, seq)
            if br.suffix:
                last = {len(br.suffix) - 1: br.first_reads()}
                br.feeds = [Feed(br.seqs[0], req.n_past, br.suffix, last)]
            else:
                br.feeds = br.head_feeds(req.n_past)
                br.in_heads = True

    def _on_branches(self, req: Request) -> None:
        """Add the label log-probabilities read in this step; move each branch on."""
        for br in req.branches:
            if not br.started or br.finished:
                continue
            for feed in br.feeds:
                for j, row in feed.rows:
                    lp = log_softmax(self.rt.logits(row))
                    for i, tok in feed.reads[j]:
                        br.lp[i] += float(lp[tok])
                feed.rows = []
                feed.step_fed = 0
            if not all(f.complete for f in br.feeds):
                continue
            if not br.in_heads and br.heads():
                # The suffix is evaluated: each label head continues on its own copy of it.
                for seq in br.seqs[1:]:
                    self.rt.seq_cp(br.seqs[0], seq)
                br.feeds = br.head_feeds(req.n_past + len(br.suffix))
                br.in_heads = True
                continue
            self._release_branch(req, br)
        self._end_if_scored(req)

    def _release_branch(self, req: Request, br: Branch) -> None:
        for seq in br.seqs:
            self.rt.seq_rm(seq)
            self.seqs.free_scratch.append(seq)
        if br.started:
            req.branch_cells -= br.cells_needed
        br.seqs, br.feeds, br.finished = [], [], True

    def _end_if_scored(self, req: Request) -> None:
        if all(br.finished for br in req.branches):
            lps = [br.lp for br in req.branches]
            self._end(req, reason="stop", result=lps if req.nested_result else lps[0])

    @staticmethod
    def _sample(req: Request, logits: np.ndarray) -> int:
        p, matcher = req.params, req.matcher
        assert req.rng is not None
        x = process_logits(logits, p, req.counts, req.recent)  # bias and penalties, once
        if matcher is None:
            return sample_token(x, p, req.rng)
        if p.temperature <= 0.0:
            # Greedy under a grammar: when the best token is one the grammar allows, it is the
            # best allowed token, so the vocabulary-wide mask (a float64 copy of the logits and
            # a 152k-entry mask) is needed only when it is not. Same tokens either way; llama.cpp's
            # sampler checks the chosen token first in the same way.
            tok = sample_token(x, p, req.rng)
            if matcher.allows(tok):
                return tok
        return sample_token(matcher.apply(x), p, req.rng)

    def _on_token(self, req: Request, logits: np.ndarray) -> None:
        p = req.params
        assert req.rng is not None and req.decoder is not None  # set when generation starts
        try:
            tok = self._sample(req, logits)
            if req.matcher is not None:
                req.matcher.accept(tok)
        except GrammarDeadEnd as exc:
            # The grammar cannot go on (a schema whose only continuations never end): the reply
            # so far is all there is, cut as by a length cap. The caller's schema, not an
            # engine fault, so not a failed request.
            log.info("the grammar cannot go on (%s); the reply ends here", exc)
            self._end(req, reason="length")
            return
        if self.rt.is_eog(tok):
            self._end(req, reason="stop")
            return
        piece = self.rt.piece(tok)
        if p.logprobs:
            req.logprobs.append(token_logprob(logits, tok, p.top_logprobs, self.rt.piece))
            req.n_bytes += len(piece)
            req.logprob_ends.append(req.n_bytes)
        if p.presence_penalty or p.frequency_penalty:
            req.counts[tok] = req.counts.get(tok, 0) + 1
        req.recent.append(tok)
        req.n_generated += 1
        self.counters["generated_tokens"] += 1
        req.last_token = tok
        req.text += req.decoder.decode(piece)
        for s in p.stop:
            at = req.text.find(s, max(0, req.n_emitted - len(s)))
            if at >= 0:
                req.text = req.text[:at]
                req.decoder.reset()  # bytes after the stop string are not part of the reply
                req.stop_sequence = s
                self._end(req, reason="stop")
                return
        if p.max_chars is not None and len(req.text) >= p.max_chars:
            req.text = req.text[: p.max_chars]
            req.decoder.reset()
            self._end(req, reason="length")
            return
        if req.matcher is not None and req.matcher.done:
            self._end(req, reason="stop")  # the grammar is complete: nothing more may follow
            return
        if req.n_generated >= p.max_tokens or req.n_past + 1 >= self.ctx_limit(req):
            self._end(req, reason="length")
            return
        # Hold back a tail that could be the start of a stop string.
        hold = max((len(s) - 1 for s in p.stop), default=0)
        upto = len(req.text) - hold
        if upto > req.n_emitted:
            self._emit_text(req, upto)

    def _emit_text(self, req: Request, upto: int, final: bool = False) -> None:
        """Send ``text[n_emitted:upto]``, after the log-probabilities of its tokens."""
        delta = req.text[req.n_emitted : upto]
        req.n_emitted_bytes += len(delta.encode("utf-8"))
        self._emit_logprobs(req, final)
        req.handle.emit_text(delta)
        req.n_emitted = upto

    @staticmethod
    def _emit_logprobs(req: Request, final: bool = False) -> None:
        """Send the log-probabilities of the tokens whose text has been sent, ahead of it.

        They spell exactly the reply's text, streamed or not: a token whose piece ends past
        the text sent so far waits (its text may still be held back, or be cut); once the reply
        is ``final``, a token cut by a stop string or a character cap keeps only its bytes
        before the cut (``token`` truncated, its log-probability as generated), and the tokens
        wholly past the cut are dropped. Byte offsets are those of the reply's UTF-8 text, exact
        while the model's bytes are valid UTF-8."""
        if not req.params.logprobs:
            return
        upto, new = req.n_emitted_bytes, []
        while req.n_logprobs_emitted < len(req.logprobs):
            entry = req.logprobs[req.n_logprobs_emitted]
            end = req.logprob_ends[req.n_logprobs_emitted]
            if end > upto:
                if not final:
                    break
                start = end - len(entry.token)
                if start < upto:  # straddles the cut: only its part in the reply
                    new.append(dataclasses.replace(entry, token=entry.token[: upto - start]))
                req.n_logprobs_emitted = len(req.logprobs)  # the rest lies past the end
                break
            new.append(entry)
            req.n_logprobs_emitted += 1
        if new:
            req.logprobs_sent.extend(new)
            req.handle.emit_logprobs(new)

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
        for br in req.branches:
            if not br.finished:
                self._release_branch(req, br)
        forks, req.forks = req.forks, []
        for fork in forks:  # the parent ended before its prompt was done: so do its choices
            self._end(fork, reason="cancelled" if error is None else reason, error=error)
        if req.pending_prefix >= 0:
            self.seqs.release_prefix(req.pending_prefix, len(req.prefix_tokens))
            req.pending_prefix = -1
        if req.slot >= 0:
            if error is not None or not self._reuses(req):
                # Failed requests may have half-written cells.
                self.seqs.clear_slot(req.slot)
            elif self.seqs.ram is not None:
                try:
                    self.seqs.park(req.slot)
                except Exception:  # e.g. no memory for the copy: the chat's cells just go
                    log.warning("could not save a finished chat to host memory", exc_info=True)
                    self.seqs.clear_slot(req.slot)
            self.seqs.free_slots.append(req.slot)
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
                self._emit_text(req, len(req.text), final=True)
        self.counters["cancelled" if reason == "cancelled" else "finished"] += 1
        usage = Usage(
            prompt_tokens=len(req.prompt) + sum(len(br.suffix) for br in req.branches),
            completion_tokens=req.n_generated,
            cached_tokens=req.cached_tokens,
        )
        logprobs = None
        if req.kind == "generate":
            result = req.text  # the whole reply, for callers that do not stream
            if req.params.logprobs:
                self._emit_logprobs(req, final=True)
                logprobs = list(req.logprobs_sent)
        req.handle.finish(Finished(reason, usage, result, logprobs, req.stop_sequence))
