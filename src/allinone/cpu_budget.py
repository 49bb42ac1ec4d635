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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath


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


def _ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["/a/b", "/a", "/"]``."""
    p = PurePosixPath(path if path.startswith("/") else "/" + path)
    return [str(p), *(str(q) for q in p.parents)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _v2_pair(folder: Path) -> tuple[str, str] | None:
    """cgroup v2's ``cpu.max``: ``"$MAX $PERIOD"``, ``max`` meaning no limit."""
    parts = (_read(folder / "cpu.max") or "").split()
    return (parts[0], parts[1]) if len(parts) == 2 and parts[0] != "max" else None


def _v1_pair(folder: Path) -> tuple[str, str] | None:
    """cgroup v1's ``cpu.cfs_quota_us`` and ``cpu.cfs_period_us`` (quota -1: no limit)."""
    quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    return (quota, period) if quota is not None and period is not None else None


def _tightest(
    mount: Path, cgroup: str, read: Callable[[Path], tuple[str, str] | None], name: str
) -> tuple[float, str] | None:
    """The smallest quota / period over ``cgroup`` and its ancestors under ``mount``."""
    best: tuple[float, str] | None = None
    for rel in _ancestors(cgroup):
        pair = read(mount / rel.lstrip("/"))
        try:
            quota, period = (int(v) for v in pair) if pair else (0, 0)
        except ValueError:
            continue
        if quota > 0 and period > 0 and (best is None or quota / period < best[0]):
            best = (quota / period, f"{name} {quota}/{period} us")
    return best


def cgroup_quota(proc_cgroup: Path, cgroup_root: Path) -> tuple[float, str] | None:
    """The tightest CPU quota on this process's cgroup or its ancestors, in CPUs, with a
    description; None when there is none (or no cgroup file system).

    ``proc_cgroup``: ``/proc/self/cgroup``; ``cgroup_root``: where cgroups are mounted
    (``/sys/fs/cgroup``). Under cgroup v1 without a cgroup namespace, a container sees the host's
    path in ``/proc/self/cgroup`` while its own cgroup is mounted at the root, so the root's
    files are read too."""
    text = _read(proc_cgroup)
    if text is None:
        return None
    found: list[tuple[float, str]] = []
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hier == "0" and controllers == "":
            q = _tightest(cgroup_root, path, _v2_pair, "cgroup v2 cpu.max")
        elif "cpu" in controllers.split(","):
            q = None
            for name in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
                mount = cgroup_root / name
                if mount.is_dir():
                    q = _tightest(mount, path, _v1_pair, "cgroup v1 quota")
                    break
        else:
            continue
        if q is not None:
            found.append(q)
    return min(found) if found else None


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
