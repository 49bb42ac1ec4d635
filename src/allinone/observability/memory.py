"""Process memory, watched: RSS plus RssAnon + VmSwap (leaked pages can be swapped out and hide
from RSS), sampled on a thread, logged as JSON lines, and checked against a memory budget.

Above the soft limit the server refuses new work (503); above the hard limit it exits non-zero
so its supervisor (systemd ``Restart=always``, Kubernetes) starts a fresh process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

log = logging.getLogger("allinone.memory")

HARD_LIMIT_EXIT_CODE = 3


@dataclass
class MemorySample:
    """One reading of /proc/<pid>/status, in bytes."""

    t: float
    rss: int
    rss_anon: int
    swap: int

    @property
    def anon_plus_swap(self) -> int:
        """Private memory whether resident or swapped: what a leak grows."""
        return self.rss_anon + self.swap


def read_memory(pid: int | str = "self") -> MemorySample:
    """Read VmRSS, RssAnon and VmSwap of a process (Linux)."""
    fields = {"VmRSS": 0, "RssAnon": 0, "VmSwap": 0}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in fields:
                fields[key] = int(rest.split()[0]) * 1024
    return MemorySample(time.time(), fields["VmRSS"], fields["RssAnon"], fields["VmSwap"])


M_MMAP_THRESHOLD = -3  # glibc malloc.h


def fix_mmap_threshold(threshold_bytes: int) -> bool:
    """Make glibc mmap every allocation of at least ``threshold_bytes`` (and munmap it on free).

    glibc starts at 128 KiB but raises the threshold to the size of any mmapped block that is
    freed (up to 32 MiB). After that, the prompt cache's saved sequence states (~12 KiB a token
    on the default model, so a few MB each) come from the heap, and the holes their eviction
    leaves let the heap grow in MB steps: the default-model soak grew +6.3 MB / 10k requests
    that way. Setting the threshold explicitly turns the dynamic raise off (mallopt(3)).
    Returns False where this is not glibc (nothing is changed there)."""
    if threshold_bytes <= 0:
        return False
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, threshold_bytes))


class MemorySampler:
    """Samples this process's memory every ``interval_s`` and enforces the budget.
    ``budget_source``: where the limits came from (``allinone.memory_budget``), logged at start."""

    def __init__(
        self,
        interval_s: float = 10.0,
        soft_limit_bytes: int | None = None,
        hard_limit_bytes: int | None = None,
        on_sample: Callable[[MemorySample], None] | None = None,
        exit_fn: Callable[[int], None] = os._exit,
        budget_source: str = "",
    ) -> None:
        self.interval_s = interval_s
        self.budget_source = budget_source
        self.soft = soft_limit_bytes
        self.hard = hard_limit_bytes
        self.on_sample = on_sample
        self.exit_fn = exit_fn
        self.last: MemorySample | None = None
        self.over_soft = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="allinone-memory", daemon=True)

    def start(self) -> None:
        """Log the budget and where it came from, take a first sample now, then keep sampling
        on a thread."""
        log.info(
            json.dumps(
                {
                    "event": "memory_budget",
                    "soft_limit": self.soft,
                    "hard_limit": self.hard,
                    "source": self.budget_source,
                }
            )
        )
        self.sample()
        self._thread.start()

    def stop(self) -> None:
        """Stop sampling."""
        self._stop.set()

    def sample(self) -> MemorySample:
        """Read memory now, log it, update gauges and the budget state."""
        s = read_memory()
        self.last = s
        if self.on_sample:
            self.on_sample(s)
        used = max(s.rss, s.anon_plus_swap)
        was_over = self.over_soft
        self.over_soft = self.soft is not None and used > self.soft
        log.info(json.dumps({"event": "memory", **asdict(s), "over_soft": self.over_soft}))
        if self.over_soft and not was_over:
            log.warning(
                json.dumps(
                    {
                        "event": "memory_soft_limit",
                        "used": used,
                        "soft_limit": self.soft,
                        "action": "refusing new work",
                    }
                )
            )
        if self.hard is not None and used > self.hard:
            log.error(
                json.dumps(
                    {
                        "event": "memory_hard_limit",
                        "used": used,
                        "hard_limit": self.hard,
                        "action": "exit for restart",
                    }
                )
            )
            logging.shutdown()
            self.exit_fn(HARD_LIMIT_EXIT_CODE)
        return s

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sample()
            except Exception:  # a failed reading must not kill the sampler
                log.exception("memory sample failed")
