"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

A container started with ``--cpus 2`` on a 64-core host sees 64 cores in its affinity mask; only
the CFS quota says it gets two CPUs' worth of time. 64 llama.cpp threads on such a quota spin and
wait for each other (Ollama issue #17916: 45x slower), so the default thread count is the
smaller of the two. The quota is read from cgroup v2's ``cpu.max`` or cgroup v1's
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, for the process's own cgroup and every ancestor
(a limit set on a parent applies to its children), as the Linux kernel documents them
(Documentation/admin-guide/cgroup-v2.rst, "cpu.max"; Documentation/scheduler/sched-bwc.rst).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

from allinone.cgroups import read, tightest_limit


@dataclass(frozen=True)
class CpuBudget:
    """``count``: CPUs to use (>= 1); ``source``: where the number came from, for logs and
    ``/ready`` (for example ``"affinity mask (64 CPUs)"`` or ``"cgroup v1 quota 200000/100000 us
    (2.0 CPUs) under an affinity mask of 64"``)."""

    count: int
    source: str


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (``os.cpu_count()`` where there is no mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def _quota(quota: str | None, period: str | None, name: str) -> tuple[float, str] | None:
    try:
        q, p = int(quota or 0), int(period or 0)
    except ValueError:
        return None
    return (q / p, f"{name} {q}/{p} us") if q > 0 and p > 0 else None


def _v2_quota(folder: Path) -> tuple[float, str] | None:
    """cgroup v2's ``cpu.max``: ``"$MAX $PERIOD"``, ``max`` meaning no limit."""
    parts = (read(folder / "cpu.max") or "").split()
    return _quota(parts[0], parts[1], "cgroup v2 cpu.max") if len(parts) == 2 else None


def _v1_quota(folder: Path) -> tuple[float, str] | None:
    """cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = read(folder / "cpu.cfs_quota_us"), read(folder / "cpu.cfs_period_us")
    return _quota(quota, period, "cgroup v1 quota")


def cgroup_quota(proc_cgroup: Path, cgroup_root: Path) -> tuple[float, str] | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in CPUs, with a
    description; None when there is none (or no cgroup file system). ``proc_cgroup``:
    ``/proc/self/cgroup``; ``cgroup_root``: where cgroups are mounted (``/sys/fs/cgroup``);
    see ``allinone.cgroups``."""
    mounts = ("cpu,cpuacct", "cpu", "cpuacct,cpu")
    return tightest_limit(proc_cgroup, cgroup_root, _v2_quota, "cpu", mounts, _v1_quota)


def cpu_budget(
    proc_cgroup: Path = Path("/proc/self/cgroup"),
    cgroup_root: Path = Path("/sys/fs/cgroup"),
    affinity: int | None = None,
) -> CpuBudget:
    """min(affinity mask, cgroup CPU quota rounded down), at least 1."""
    mask = affinity_cpus() if affinity is None else affinity
    quota = cgroup_quota(proc_cgroup, cgroup_root)
    if quota is None or math.floor(quota[0]) >= mask:
        suffix = f"; {quota[1]} ({quota[0]:g} CPUs) allows more" if quota else ""
        return CpuBudget(mask, f"affinity mask ({mask} CPUs){suffix}")
    count = max(1, math.floor(quota[0]))
    return CpuBudget(count, f"{quota[1]} ({quota[0]:g} CPUs) under an affinity mask of {mask} CPUs")
