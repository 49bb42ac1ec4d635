"""Helpers shared by the benchmark scripts: data loading, percentiles, memory, output."""

from __future__ import annotations

import json
import os
import platform
import statistics
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data" / "sentiment"


def read_tsv(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(label value, text) rows of a `label<TAB>text` file with a header."""
    rows = []
    with path.open(encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            value, _, text = line.rstrip("\n").partition("\t")
            rows.append((value, text))
            if limit and len(rows) >= limit:
                break
    return rows


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation."""
    if not values:
        return float("nan")
    return (
        statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]
        if q < 100
        else max(values)
    )


def rss_mb(pid: int | None = None) -> float:
    """Resident memory of a process in MB."""
    return psutil.Process(pid or os.getpid()).memory_info().rss / 1e6


def machine() -> dict:
    """What the figures were measured on."""
    model, flags = "", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and not model:
                model = value.strip()
            elif key.strip() == "flags" and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": model,
        # the SIMD that decides which llama.cpp and torch kernels run
        "simd": sorted(flags & {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16"}),
        "cores": len(os.sched_getaffinity(0)),
        "ram_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
    }


def llama_server_binary() -> str:
    """Path of llama.cpp's llama-server built from the vendored sources (built once, with the
    flags the wheel was built with: ``build_llama_server.sh``)."""
    import subprocess

    build = Path(__file__).with_name("build_llama_server.sh")
    return subprocess.run([str(build)], capture_output=True, text=True, check=True).stdout.strip()


def write_result(name: str, data: dict) -> Path:
    """Save a benchmark's figures under bench-results/ (ignored by git)."""
    out = ROOT / "bench-results"
    out.mkdir(exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False))
    return path
