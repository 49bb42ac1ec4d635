"""Finished chats' KV cells kept in host memory, so a conversation that comes back is restored
instead of evaluated again.

Every finished chat waits here rather than in its sequence (``SequencePools.park``: cells left
in the KV cache slow every step), and with more conversations than sequences (8 users on 4
slots) there is nowhere else to keep them. Evaluating a whole history again costs ~4.5 ms a
token here; copying the saved cells back took ~0.5 ms for a whole chat of a few hundred tokens.
llama.cpp's own server does the same (``--cache-ram``).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np


@dataclass
class Entry:
    """One saved sequence: the tokens its cells hold, position by position, and their state."""

    tokens: np.ndarray
    data: bytearray


class PromptCache:
    """Saved sequences, least recently used first, within a byte budget.

    Only the engine thread uses it (no locking)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next_id = 0

    def __len__(self) -> int:
        return len(self._entries)

    def match(self, tokens: list[int], limit: int) -> tuple[int, int]:
        """The entry sharing the longest start with ``tokens`` (at most ``limit`` tokens):
        (entry id, shared tokens), or (-1, 0)."""
        if not self._entries or limit <= 0:
            return -1, 0
        query = np.asarray(tokens[:limit], dtype=np.int32)
        best, best_n = -1, 0
        for key, entry in self._entries.items():
            n = min(len(entry.tokens), len(query))
            if n <= best_n:
                continue
            same = entry.tokens[:n] == query[:n]
            common = n if same.all() else int(np.argmin(same))
            if common > best_n:
                best, best_n = key, common
        return best, best_n

    def holds(self, tokens: list[int]) -> bool:
        """Whether an entry holds all of ``tokens`` (and perhaps more)."""
        n = len(tokens)
        arr = np.asarray(tokens, dtype=np.int32)
        return any(
            len(e.tokens) >= n and np.array_equal(e.tokens[:n], arr) for e in self._entries.values()
        )

    def put(self, tokens: list[int], data: bytearray) -> bool:
        """Keep a sequence's state; False when it alone exceeds the budget."""
        if len(data) > self.max_bytes:
            return False
        arr = np.asarray(tokens, dtype=np.int32)
        # An entry this one extends holds nothing more: drop it. One that extends this one
        # already holds all of it: keep that instead.
        for key, entry in list(self._entries.items()):
            n = min(len(entry.tokens), len(arr))
            if np.array_equal(entry.tokens[:n], arr[:n]):
                if len(entry.tokens) >= len(arr):
                    self._entries.move_to_end(key)
                    return True
                self._remove(key)
        while self._entries and self.bytes + len(data) > self.max_bytes:
            self._remove(next(iter(self._entries)))
        self._entries[self._next_id] = Entry(arr, data)
        self._next_id += 1
        self.bytes += len(data)
        return True

    def get(self, key: int) -> Entry:
        """An entry, now the most recently used. It stays: when the sequence it goes back into
        is saved again, the longer conversation replaces it (see ``put``)."""
        self._entries.move_to_end(key)
        return self._entries[key]

    def _remove(self, key: int) -> None:
        self.bytes -= len(self._entries.pop(key).data)
