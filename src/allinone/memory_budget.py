"""The server's memory budget: explicit settings, or derived from its cgroup's memory limit.

A container started with ``--memory 1g`` is killed by the kernel's OOM killer (exit 137, no
message, requests in flight lost) once its cgroup's charge passes the limit. The server's own
budget (``observability.memory.MemorySampler``) acts first: above the soft limit new work gets
503 ``memory_pressure``; above the hard limit the process exits with code 3 for its supervisor.
When neither limit is set, both are derived from the tightest cgroup memory limit on the
process's cgroup or its ancestors: cgroup v2 ``memory.max`` or cgroup v1
``memory.limit_in_bytes`` (Documentation/admin-guide/cgroup-v2.rst, "memory.max";
Documentation/admin-guide/cgroup-v1/memory.rst), with the proportions ``allinone plan`` uses for
deployment files: soft at 80 % of the limit, hard at 90 %.

The margins cover what the sampler cannot see at once: memory keeps growing between two samples
(``ALLINONE_MEMORY_SAMPLE_S``) and while work admitted before the soft limit tripped finishes;
the cgroup also charges page cache that RSS does not show. The kernel reclaims clean file pages
(the memory-mapped GGUF) before it kills, so RSS near the limit is not yet an OOM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allinone.cgroups import read, tightest_limit

MiB = 1024 * 1024
SOFT_SHARE = 0.80
HARD_SHARE = 0.90
# cgroup v1 reports "no limit" as PAGE_COUNTER_MAX pages (9223372036854771712 on 4 KiB pages);
# a limit at or above the machine's memory limits nothing either.
_UNLIMITED = 1 << 62


@dataclass(frozen=True)
class MemoryBudget:
    """``soft_bytes`` / ``hard_bytes``: the sampler's limits (None: none); ``source``: where they
    came from, for the start-up log and ``/ready``; ``cgroup_limit_bytes``: the limit they were
    derived from, when they were."""

    soft_bytes: int | None
    hard_bytes: int | None
    source: str
    cgroup_limit_bytes: int | None = None

    def as_dict(self) -> dict:
        """The budget in MiB, as ``/ready`` reports it."""

        def mb(n: int | None) -> int | None:
            return None if n is None else n // MiB

        return {
            "soft_limit_mb": mb(self.soft_bytes),
            "hard_limit_mb": mb(self.hard_bytes),
            "cgroup_limit_mb": mb(self.cgroup_limit_bytes),
            "source": self.source,
        }


def _limit(text: str | None) -> int | None:
    """A memory limit file's value in bytes; None for "max", unlimited or unreadable."""
    if text is None or text == "max":
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if 0 < value < _UNLIMITED else None


def _described(value: int | None, name: str) -> tuple[int, str] | None:
    return None if value is None else (value, f"{name} {value} bytes ({value / MiB:.0f} MiB)")


def cgroup_memory_limit(proc_cgroup: Path, cgroup_root: Path) -> tuple[int, str] | None:
    """The tightest memory limit on this process's cgroup or its ancestors, in bytes, with a
    description; None when there is none (or no cgroup file system); see
    ``allinone.cgroups``."""

    def v2(folder: Path) -> tuple[int, str] | None:
        return _described(_limit(read(folder / "memory.max")), "cgroup v2 memory.max")

    def v1(folder: Path) -> tuple[int, str] | None:
        limit = _limit(read(folder / "memory.limit_in_bytes"))
        return _described(limit, "cgroup v1 memory.limit")

    return tightest_limit(proc_cgroup, cgroup_root, v2, "memory", ("memory",), v1)


def total_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """MemTotal in bytes (None where unreadable)."""
    for line in (read(meminfo) or "").splitlines():
        key, _, rest = line.partition(":")
        if key == "MemTotal":
            return int(rest.split()[0]) * 1024
    return None


def memory_budget(
    soft_limit_mb: int | None,
    hard_limit_mb: int | None,
    from_cgroup: bool = True,
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    meminfo: Path = Path("/proc/meminfo"),
) -> MemoryBudget:
    """Explicit limits win (either one set: both as given); otherwise, with ``from_cgroup``,
    soft = 80 % and hard = 90 % of the cgroup's memory limit; otherwise none."""
    if soft_limit_mb is not None or hard_limit_mb is not None:
        return MemoryBudget(
            soft_limit_mb * MiB if soft_limit_mb else None,
            hard_limit_mb * MiB if hard_limit_mb else None,
            "settings (ALLINONE_MEMORY_SOFT_LIMIT_MB / ALLINONE_MEMORY_HARD_LIMIT_MB)",
        )
    if not from_cgroup:
        return MemoryBudget(None, None, "none (ALLINONE_MEMORY_FROM_CGROUP=false)")
    limit = cgroup_memory_limit(proc_cgroup, cgroup_root)
    total = total_memory(meminfo)
    if limit is None:
        return MemoryBudget(None, None, "none (no cgroup memory limit)")
    if total is not None and limit[0] >= total:
        return MemoryBudget(
            None, None, f"none ({limit[1]} is not below the machine's {total / MiB:.0f} MiB)"
        )
    return MemoryBudget(
        int(limit[0] * SOFT_SHARE),
        int(limit[0] * HARD_SHARE),
        f"{limit[1]}: soft {SOFT_SHARE:.0%}, hard {HARD_SHARE:.0%} of it",
        limit[0],
    )
