"""Prove, before serving, that the installed llama.cpp runs on this CPU.

A llama.cpp compiled with an extension the host lists but cannot execute (AMX on some
virtualised Xeons) dies with SIGILL at its first *batched* decode. Found at the first user's
request that kills every request in flight; found here, it stops the start-up with a message.

:func:`check_library_runs` decodes a prompt of :data:`CHECK_PROMPT_TOKENS` tokens with the model
in a child process (the smoke test of :mod:`allinone.llama_build`), so a trap is reported instead
of suffered. A passing check is remembered under the cache directory, keyed by the library's
files, the CPU and the model file, so it costs a child process (~1-2 s) once per library, host and
model, not at every start.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import sys
from pathlib import Path

from allinone import llama_build

log = logging.getLogger(__name__)
CHECK_PROMPT_TOKENS = 64


class HostCheckError(RuntimeError):
    """The installed llama.cpp cannot run on this host; the message says what to do."""


def library_dir() -> Path | None:
    """The folder of llama-cpp-python's shared libraries, or None if it is not installed."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "lib"


def _key(model_path: Path) -> str:
    parts: list[str] = [json.dumps(llama_build.host_description(), sort_keys=True)]
    lib = library_dir()
    parts.append(f"extra_bufts={extra_bufts()}")
    for f in sorted(lib.iterdir()) if lib and lib.is_dir() else []:
        st = f.stat()
        parts.append(f"{f.name}:{st.st_size}:{st.st_mtime_ns}")
    st = model_path.stat()
    parts.append(f"{model_path.resolve()}:{st.st_size}:{st.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:20]


def check_library_runs(model_path: Path, cache_dir: Path | None) -> str:
    """Decode :data:`CHECK_PROMPT_TOKENS` tokens of ``model_path`` in a child process.

    Returns llama.cpp's system info line (which SIMD paths it uses). Raises HostCheckError,
    naming the CPU and what to do, when the child dies (SIGILL or otherwise).
    ``cache_dir``: where passing checks are remembered (None: always run).
    """
    model_path = Path(model_path)
    marker = None
    if cache_dir is not None:
        marker = Path(cache_dir) / "host-checks" / f"{_key(model_path)}.json"
        try:
            return json.loads(marker.read_text())["system_info"]
        except (OSError, ValueError, KeyError):
            pass
    result = llama_build.run_smoke(
        sys.executable, model_path, n_prompt=CHECK_PROMPT_TOKENS, extra_bufts=extra_bufts()
    )
    if not result.ok:
        host = llama_build.host_description()
        raise HostCheckError(
            f"llama.cpp cannot run on this host: a {CHECK_PROMPT_TOKENS}-token test decode of "
            f"{model_path.name} failed ({result.message}). CPU: {host['cpu'] or 'unknown'}; "
            f"llama.cpp system info: {result.system_info.strip() or 'unknown'}. The installed "
            "llama-cpp-python was built for another CPU or with instructions this host lists but "
            "cannot execute. Rebuild it here: `rm -rf .venv && make setup` (the build probes the "
            "CPU and smoke-tests the result), or force flags with ALLINONE_LLAMA_CMAKE_ARGS / "
            "ALLINONE_LLAMA_CFLAGS (see docs/install.md)."
        )
    if marker is not None:
        # A read-only cache (a container's model volume) only means the check runs again at the
        # next start; the check itself passed.
        try:
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(
                json.dumps({"system_info": result.system_info, "model": str(model_path)})
            )
        except OSError as exc:
            log.info("host check passed; its marker cannot be kept (%s)", exc)
    return result.system_info


def extra_bufts() -> bool:
    """Whether models load with llama.cpp's extra buffer types (AMX, repacked weights): off
    when the build's ladder kept the native wheel only with them off (``build.json``
    ``load.use_extra_bufts``), or when ``ALLINONE_LLAMA_EXTRA_BUFTS=0``."""
    env = os.environ.get("ALLINONE_LLAMA_EXTRA_BUFTS")
    if env is not None:
        return env.strip().lower() not in ("0", "false", "no", "off")
    record = build_record() or {}
    return bool(record.get("load", {}).get("use_extra_bufts", True))


def build_record() -> dict | None:
    """What ``make`` recorded about the installed wheel's build (flags, probes, smoke test), if
    this environment was set up by the project's Makefile."""
    path = Path(sys.prefix) / "llama-build.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
