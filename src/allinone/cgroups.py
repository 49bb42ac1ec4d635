"""Reading this process's cgroup limits, for cgroup v2 and v1 alike.

A limit set on a cgroup applies to its children, so the tightest value over the process's own
cgroup and every ancestor counts (Linux, Documentation/admin-guide/cgroup-v2.rst and
Documentation/admin-guide/cgroup-v1/). Under cgroup v1 without a cgroup namespace a container
sees the host's path in ``/proc/self/cgroup`` while its own cgroup is mounted at the root, so
the root's files are read too (the root is among the ancestors).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import TypeVar

T = TypeVar("T", bound=tuple)

Reader = Callable[[Path], T | None]
"""Reads one cgroup folder's limit as a tuple that sorts tightest first (value, description);
None where that folder sets none."""


def ancestors(path: str) -> list[str]:
    """``/a/b`` -> ``["/a/b", "/a", "/"]``."""
    p = PurePosixPath(path if path.startswith("/") else "/" + path)
    return [str(p), *(str(q) for q in p.parents)]


def read(path: Path) -> str | None:
    """A cgroup (or proc) file's stripped text; None where it cannot be read."""
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _over_ancestors(mount: Path, cgroup: str, reader: Reader[T]) -> T | None:
    found = [v for rel in ancestors(cgroup) if (v := reader(mount / rel.lstrip("/")))]
    return min(found) if found else None


def tightest_limit(
    proc_cgroup: Path,
    cgroup_root: Path,
    v2: Reader[T],
    v1_controller: str,
    v1_mounts: tuple[str, ...],
    v1: Reader[T],
) -> T | None:
    """The tightest limit over this process's cgroups (``proc_cgroup``: ``/proc/self/cgroup``)
    and their ancestors under ``cgroup_root`` (``/sys/fs/cgroup``): cgroup v2's unified tree
    read with ``v2``; cgroup v1's ``v1_controller`` hierarchy, mounted under the first of
    ``v1_mounts`` that exists, read with ``v1``. None when no limit is set (or no cgroup file
    system)."""
    text = read(proc_cgroup)
    if text is None:
        return None
    found: list[T] = []
    for line in text.splitlines():
        hier, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        value = None
        if hier == "0" and controllers == "":
            value = _over_ancestors(cgroup_root, path, v2)
        elif v1_controller in controllers.split(","):
            mount = next((cgroup_root / m for m in v1_mounts if (cgroup_root / m).is_dir()), None)
            if mount is not None:
                value = _over_ancestors(mount, path, v1)
        if value is not None:
            found.append(value)
    return min(found) if found else None
