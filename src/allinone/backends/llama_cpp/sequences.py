"""The engine's sequence ids and what their KV cells hold: request slots, cached task prefixes,
scratch branches, and finished chats in host memory (or, with that off, in their slots).

Runs on the engine loop's thread only. Layout: ``backends/kv_layout.py``.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

from allinone.backends.kv_layout import KVLayout
from allinone.backends.llama_cpp.prompt_cache import PromptCache
from allinone.backends.llama_cpp.request import Request
from allinone.backends.llama_cpp.runtime import LlamaRuntime

log = logging.getLogger(__name__)

# A slot's chat cells go to host memory when at least this many tokens would be lost (saving
# costs a copy of every cell of the sequence; a short tail is cheaper to evaluate again).
_SAVE_MIN_TOKENS = 32
# A saved conversation is restored when it keeps at least this many more tokens than the best
# slot does (restoring copies all its cells back: ~0.5 ms for a chat of a few hundred tokens
# here, against ~4.5 ms for each token evaluated).
_RESTORE_MIN_GAIN = 16


class SequencePools:
    """Free and busy sequence ids, the tokens each slot's cells hold, the prefix cache and the
    host-memory prompt cache (``ram``, None when off). ``counters``: the loop's counters."""

    def __init__(
        self,
        rt: LlamaRuntime,
        layout: KVLayout,
        ram: PromptCache | None,
        counters: dict[str, int],
    ) -> None:
        self.rt, self.layout, self.ram, self.counters = rt, layout, ram, counters
        self.free_slots = list(layout.slots)  # least recently freed first
        # the tokens each slot's cells hold, position by position
        self.slot_tokens: dict[int, list[int]] = {s: [] for s in layout.slots}
        self.free_prefix_seqs = list(layout.prefix_seqs)
        self.free_scratch = list(layout.scratch_seqs)
        # prefix key -> (sequence id, token count); least recently used first
        self.prefixes: OrderedDict[tuple, tuple[int, int]] = OrderedDict()
        self.prefix_tokens_used = 0

    def pick_slot(self, req: Request, reuses: bool) -> tuple[int, int]:
        """Take a free slot: the one whose cells share the longest start with this chat's
        tokens, else the least recently used; returns (slot, tokens it can keep)."""
        best, best_n = 0, 0
        if reuses:
            full = req.prompt
            limit = len(full) - 1  # the last token is always fed again: it gives the logits
            for i, slot in enumerate(self.free_slots):
                held = self.slot_tokens[slot]
                n, top = 0, min(len(held), limit)
                while n < top and held[n] == full[n]:
                    n += 1
                if n > best_n:
                    best, best_n = i, n
        if best_n == 0:  # no match: keep other chats' cells, take an empty slot if there is one
            best = next((i for i, s in enumerate(self.free_slots) if not self.slot_tokens[s]), 0)
        return self.free_slots.pop(best), best_n

    def save(self, slot: int, keep: int = 0) -> None:
        """Copy a free slot's chat cells to host memory before all but ``keep`` of them go."""
        held = self.slot_tokens[slot]
        if self.ram is None or len(held) - keep < _SAVE_MIN_TOKENS or self.ram.holds(held):
            return
        if self.ram.put(held, self.rt.seq_save(slot)):
            self.counters["prompt_cache_saves"] += 1

    def restore(self, req: Request, common: int) -> int:
        """Put back the saved conversation that shares the most with this chat, when it beats
        the ``common`` tokens the picked slot keeps; returns the tokens the slot now shares."""
        ram = self.ram
        assert ram is not None  # only called with the prompt cache on
        full = list(req.prompt)
        key, n = ram.match(full, len(full) - 1)
        # The task prefix comes from the prefix cache at no cost: a saved chat must beat that
        # too (else every new chat with the same system prompt would bring back an old one).
        if key < 0 or n < max(common, len(req.prefix_tokens)) + _RESTORE_MIN_GAIN:
            return common
        # Take the entry before saving what the slot holds: that save may evict it.
        entry = ram.get(key)
        self.save(req.slot)  # the slot may hold another conversation
        held = self.slot_tokens[req.slot]
        held.clear()
        if not self.rt.seq_restore(req.slot, entry.data):
            log.warning("no KV cells to restore a saved chat into; evaluating it again")
            return 0
        held.extend(entry.tokens.tolist())
        self.counters["restored_tokens"] += n
        return n

    def park(self, slot: int) -> None:
        """A finished chat leaves the KV cache for host memory; its next turn restores it.

        Why not keep its cells in the slot: in the one KV buffer all sequences share, llama.cpp's
        attention runs over every cell up to the highest in use and checks each against the
        mask, for every query row and head, so cells left in idle slots slow every later step
        (figures: ``benchmarks/bench_kv_spread.py`` and docs/benchmarks.md).
        Saving and restoring a chat of a few hundred cells costs ~1 ms each way. Chats shorter
        than ``_SAVE_MIN_TOKENS`` are dropped (cheaper to evaluate again); a chat bigger than
        the whole cache stays in its slot, reused from there as with the cache off (its cells
        go when the KV cache runs out of room: ``drop_idle_cells``)."""
        assert self.ram is not None  # only called with the prompt cache on
        held = self.slot_tokens[slot]
        if len(held) >= _SAVE_MIN_TOKENS and self.rt.seq_state_size(slot) > self.ram.max_bytes:
            return
        self.save(slot)
        self.clear_slot(slot)

    def drop_idle_cells(self) -> bool:
        """Free the cells that finished requests left in free slots; True if any were held."""
        dropped = False
        for slot in self.free_slots:
            if self.slot_tokens[slot]:
                self.save(slot)
                self.clear_slot(slot)
                dropped = True
        return dropped

    def clear_slot(self, slot: int) -> None:
        """Remove a slot's cells and forget the tokens it held."""
        self.rt.seq_rm(slot)
        self.slot_tokens[slot].clear()

    def prefix_for(self, req: Request) -> tuple[int, int]:
        """The sequence holding this request's prefix: (sequence, tokens) on a hit, else
        (-1, 0). On a miss with room in the cache, a prefix sequence is reserved
        (``req.pending_prefix``): the request evaluates its prefix in its own slot, in a step
        shared with everyone else, and the prefix's cells are then tagged with that sequence
        (``register_prefix``)."""
        n = len(req.prefix_tokens)
        if n == 0:
            return -1, 0
        hit = self.prefixes.get(req.prefix_key)
        if hit is not None:
            self.prefixes.move_to_end(req.prefix_key)
            self.counters["prefix_hits"] += 1
            return hit
        self.counters["prefix_misses"] += 1
        if n > self.layout.prefix_cache_tokens:
            return -1, 0
        while self.prefixes and (
            not self.free_prefix_seqs
            or self.prefix_tokens_used + n > self.layout.prefix_cache_tokens
        ):
            _, (old_seq, old_n) = self.prefixes.popitem(last=False)
            self.rt.seq_rm(old_seq)  # requests that copied it keep their cells
            self.free_prefix_seqs.append(old_seq)
            self.prefix_tokens_used -= old_n
        # Every prefix sequence may be reserved by requests still evaluating theirs.
        if self.free_prefix_seqs and self.prefix_tokens_used + n <= self.layout.prefix_cache_tokens:
            req.pending_prefix = self.free_prefix_seqs.pop()
            self.prefix_tokens_used += n
        return -1, 0

    def register_prefix(self, req: Request) -> None:
        """The request's prefix is evaluated: share its cells with the reserved sequence."""
        seq, n, req.pending_prefix = req.pending_prefix, len(req.prefix_tokens), -1
        if req.prefix_key in self.prefixes:  # another request got there first
            self.release_prefix(seq, n)
            return
        self.rt.seq_cp(req.slot, seq, 0, n)
        self.prefixes[req.prefix_key] = (seq, n)

    def release_prefix(self, seq: int, n: int) -> None:
        self.rt.seq_rm(seq)
        self.free_prefix_seqs.append(seq)
        self.prefix_tokens_used -= n

    def check_invariants(self) -> None:
        """Assert the pools' bookkeeping matches llama.cpp's cells, with no request running.
        AssertionError names the first broken rule."""
        assert sorted(self.free_slots) == list(range(self.layout.parallel)), "a slot was not freed"
        for slot in range(self.layout.parallel):
            # a free slot holds only what the loop knows it keeps for the next chat turn
            held = len(self.slot_tokens[slot])
            assert self.rt.seq_pos_max(slot) == held - 1, f"slot {slot}: cells != tokens held"
        for seq in self.free_scratch:
            assert self.rt.seq_pos_max(seq) == -1, f"scratch sequence {seq} holds cells"
        assert len(self.free_scratch) == self.layout.n_scratch, "scratch leaked"
        cached = sum(n for _, n in self.prefixes.values())
        assert self.prefix_tokens_used == cached, "prefix budget != cached prefixes' tokens"
        n_prefix_seqs = len(self.free_prefix_seqs) + len(self.prefixes)
        assert n_prefix_seqs == self.layout.prefix_cache_size, "a prefix sequence leaked"
