"""Resource plans: the memory one instance needs, whether it fits its devices, the limits to ask.

Every figure is arithmetic on the model shape; each estimate that is not pure arithmetic says its
basis in ``basis``. CPU plans model this project's llama.cpp engine (its KV layout, output buffer
and repacked weights, checked against measured RSS by a test); GPU plans model vLLM.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

from allinone.backends.kv_layout import SCRATCH_CELLS_PER_SLOT, KVLayout
from allinone.planner import formats
from allinone.planner.shapes import ModelShape, resolve_shape
from allinone.settings import EngineSettings

MiB = 2**20
GiB = 2**30

# Measured on this machine (python 3.11, llama-cpp-python 0.3.36): RSS of the server process before
# the model loads, and llama.cpp's own anonymous memory after load beyond its named buffers
# (tokenizer tables, graph metadata, thread pool).
PROCESS_BASE_BYTES = 72 * MiB
LLAMA_RUNTIME_BYTES = 49 * MiB
# This project's engine at its default settings (the KV layout itself: backends/kv_layout.py).
_ENGINE = EngineSettings.model_fields
PREFIX_CACHE_TOKENS = _ENGINE["prefix_cache_tokens"].default
N_BATCH = _ENGINE["n_batch"].default
PROMPT_CACHE_BYTES = _ENGINE["prompt_cache_mb"].default * MiB
# vLLM estimates (not measured here): CUDA context + NCCL per GPU, CUDA graphs, batched tokens.
CUDA_CONTEXT_BYTES = 768 * MiB
CUDA_GRAPHS_BYTES = 512 * MiB
VLLM_BATCHED_TOKENS = 8192


@dataclass(frozen=True)
class Devices:
    """Where instances run: ``cpu`` (host RAM) or ``count`` GPUs of ``bytes_each``."""

    kind: str  # "cpu" | "gpu"
    count: int
    bytes_each: int

    @classmethod
    def parse(cls, text: str) -> Devices:
        """``cpu``, ``cpu:16GiB``, ``4x24GiB`` or ``1x80GiB``."""
        t = text.strip().lower()
        if t == "cpu":
            return cls("cpu", 1, _host_ram())
        m = re.fullmatch(r"cpu:(\d+(?:\.\d+)?)(gib|gb|mib)", t)
        if m:
            return cls("cpu", 1, _size(m.group(1), m.group(2)))
        m = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)(gib|gb|mib)", t)
        if m and int(m.group(1)) >= 1:
            return cls("gpu", int(m.group(1)), _size(m.group(2), m.group(3)))
        raise ValueError(f"bad --devices {text!r}: use cpu, cpu:16GiB, 4x24GiB or 1x80GiB")

    def label(self) -> str:
        """The devices as written on the command line."""
        if self.kind == "cpu":
            return f"cpu:{self.bytes_each / GiB:.0f}GiB"
        return f"{self.count}x{self.bytes_each / GiB:.0f}GiB"


def _size(number: str, unit: str) -> int:
    scale = {"gib": GiB, "gb": 10**9, "mib": MiB}[unit]
    return int(float(number) * scale)


def _host_ram() -> int:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except Exception:  # pragma: no cover - psutil is a dependency
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def valid_tp_sizes(shape: ModelShape, limit: int) -> list[int]:
    """Tensor-parallel sizes up to ``limit`` that divide both the attention and the KV heads."""
    return [n for n in range(1, limit + 1) if shape.heads % n == 0 and shape.kv_heads % n == 0]


def _round_up(n: float, step: int) -> int:
    return int(math.ceil(n / step) * step)


@dataclass
class PlanRequest:
    """What to plan for (the ``allinone plan`` flags)."""

    model: str = "default"
    dtype: str | None = None  # None: q4_k_m on CPU (the catalog format), bf16 on GPUs
    kv_dtype: str = "fp16"
    context: int = 2048
    concurrency: int = 4
    devices: str = "cpu"
    instances: int = 1
    headroom: float = 0.10
    threads: int = 2


def make_plan(req: PlanRequest) -> dict:
    """The plan for ``req`` as one JSON-ready dict (see docs/deployment.md, "Planning")."""
    if req.context < 1 or req.concurrency < 1 or req.instances < 1:
        raise ValueError("--context, --concurrency and --instances must be at least 1")
    if not 0 <= req.headroom < 1:
        raise ValueError("--headroom must be in [0, 1)")
    if req.kv_dtype not in formats.KV_DTYPES:
        raise ValueError(
            f"unknown --kv-dtype {req.kv_dtype!r}; valid: {', '.join(formats.KV_DTYPES)}"
        )
    devices = Devices.parse(req.devices)
    shape = resolve_shape(req.model)
    gguf_path = Path(req.model).expanduser()
    from_gguf = gguf_path.suffix == ".gguf" and gguf_path.is_file()
    cpu = devices.kind == "cpu"
    dtype = req.dtype or ("q4_k_m" if cpu or from_gguf else "bf16")
    if from_gguf and req.dtype and req.dtype != "q4_k_m":
        raise ValueError("--dtype does not apply to a GGUF file: its tensors already have types")

    # -- weights ---------------------------------------------------------------------------
    if from_gguf:
        real = formats.gguf_weights(gguf_path)
        groups, weights, repacked = real.groups, real.tensor_bytes, real.repacked_bytes
        file_bytes = real.file_bytes
        dtype = "gguf"
    else:
        groups = formats.weight_groups(shape, dtype)
        weights = sum(groups.values())
        repacked = formats.repacked_bytes(shape, dtype)
        gguf_format = dtype in ("q8_0", "q4_k_m")
        file_bytes = weights + (
            shape.vocab * formats.GGUF_METADATA_BYTES_PER_TOKEN if gguf_format else 0
        )
    if cpu and dtype in ("gptq-int4", "awq-int4"):
        raise ValueError(f"{dtype} runs on GPUs; on cpu use q4_k_m or q8_0")

    # -- KV cache --------------------------------------------------------------------------
    kv_elem = formats.KV_DTYPES[req.kv_dtype]
    kv_per_token = shape.kv_bytes_per_token(kv_elem)
    mha_per_token = 2 * shape.layers * shape.heads * shape.head_dim * kv_elem
    asked_tokens = req.context * req.concurrency
    plan: dict = {
        "model": shape.name,
        "model_ref": req.model,
        "shape": shape.to_dict(),
        "dtype": dtype,
        "kv_dtype": req.kv_dtype,
        "context": req.context,
        "concurrency": req.concurrency,
        "devices": {
            "kind": devices.kind,
            "count": devices.count,
            "bytes_each": devices.bytes_each,
            "label": devices.label(),
        },
        "instances": req.instances,
        "headroom": req.headroom,
        "weights_bytes": weights,
        "weights_groups": groups,
        "kv_bytes_per_token": kv_per_token,
        "kv_bytes_per_token_mha": mha_per_token,
        "gqa_saving": mha_per_token / kv_per_token,
        "kv_bytes_asked": kv_per_token * asked_tokens,
        "basis": {},
    }
    if req.context > shape.context:
        plan["warnings"] = [
            f"context {req.context} is beyond the model's native {shape.context} tokens "
            "(needs RoPE scaling such as YaRN)"
        ]
    if cpu:
        _plan_cpu(plan, req, shape, devices, file_bytes, repacked, kv_per_token)
    else:
        _plan_gpu(plan, req, shape, devices, weights, kv_per_token)
    return plan


def _plan_cpu(plan, req, shape, devices, file_bytes, repacked, kv_per_token) -> None:
    """This project's llama.cpp engine: every buffer it allocates, as llama.cpp sizes them."""
    layout = KVLayout(
        parallel=req.concurrency,
        ctx_per_seq=req.context,
        prefix_cache_size=_ENGINE["prefix_cache_size"].default,
        prefix_cache_tokens=PREFIX_CACHE_TOKENS,
        max_choices=_ENGINE["max_choices"].default,
    )
    kv_total = int(kv_per_token * layout.n_cells)
    output = layout.n_seq_max * shape.vocab * 4
    workspace = N_BATCH * (3 * shape.intermediate + 8 * shape.hidden) * 4
    overhead = PROCESS_BASE_BYTES + LLAMA_RUNTIME_BYTES
    after_load = file_bytes + repacked + kv_total + output + overhead
    after_fill = after_load + workspace
    # Finished chats kept in host memory fill up to their budget over time, on top of that.
    full = after_fill + PROMPT_CACHE_BYTES
    limit = _round_up(full * 1.3, 64 * MiB)
    plan["basis"].update(
        {
            "weights": "the GGUF file, memory-mapped and fully resident after load",
            "repacked": "Q4_0/Q4_K tensors other than token embeddings, copied by llama.cpp's "
            "CPU_REPACK buffer",
            "kv": f"context x concurrency + {PREFIX_CACHE_TOKENS} cells for cached task prefixes "
            f"+ {SCRATCH_CELLS_PER_SLOT} scratch cells per sequence (backends/kv_layout.py)",
            "output": "llama.cpp output buffer: n_seq_max x vocab x 4 bytes (fp32 logits)",
            "workspace": f"compute buffer pages touched by a {N_BATCH}-token batch: "
            "n_batch x (3 x intermediate + 8 x hidden) x 4 bytes",
            "overhead": "measured here: python server before load "
            f"({PROCESS_BASE_BYTES // MiB} MiB) + llama.cpp runtime "
            f"({LLAMA_RUNTIME_BYTES // MiB} MiB)",
            "prompt_cache": f"finished chats' KV cells kept in host memory: "
            f"ALLINONE_PROMPT_CACHE_MB's default {PROMPT_CACHE_BYTES // MiB} MiB",
            "limit": "predicted RSS after filling the context and the prompt cache x 1.3 "
            "(allocator slack, requests)",
        }
    )
    total = full
    per_device = total * req.instances
    capacity = devices.bytes_each * (1 - req.headroom)
    plan.update(
        {
            "engine": "llama_cpp",
            "kv_tokens": layout.n_cells,
            "kv_bytes_total": kv_total,
            "repacked_bytes": repacked,
            "output_buffer_bytes": output,
            "workspace_bytes": workspace,
            "overhead_bytes": overhead,
            "prompt_cache_bytes": PROMPT_CACHE_BYTES,
            "total_bytes": total,
            "per_device_bytes": per_device,
            "fits": per_device <= capacity,
            "predicted_rss": {"after_load": after_load, "after_fill": after_fill},
            "tensor_parallel": {"size": 1, "valid_sizes": [1]},
            "layouts": [],
            "host": {
                "memory_limit_bytes": limit,
                "cpus": req.threads,
                "shm_bytes": 64 * MiB,
            },
            "server": _server_settings(req, full, limit),
        }
    )


def _server_settings(req: PlanRequest, expected: int, limit: int) -> dict:
    """The server's own budget sits below the container/unit limit: it refuses work first (soft),
    then exits for its supervisor to restart it (hard), before the kernel's OOM killer acts."""
    return {
        "parallel": req.concurrency,
        "ctx_per_seq": req.context,
        "threads": req.threads,
        "memory_soft_limit_mb": int(min(max(expected * 1.1, limit * 0.8), limit * 0.85) // MiB),
        "memory_hard_limit_mb": int(limit * 0.9 // MiB),
    }


def _gpu_instance(shape, weights, kv_per_token, tokens, concurrency, tp) -> dict:
    """Bytes one GPU of a ``tp``-way instance holds (weights and KV heads split across GPUs)."""
    workspace = VLLM_BATCHED_TOKENS * (4 * shape.hidden + 2 * shape.intermediate // tp) * 2
    logits = concurrency * shape.vocab * 4
    fixed = weights / tp + workspace + logits + CUDA_CONTEXT_BYTES + CUDA_GRAPHS_BYTES
    return {
        "weights": weights / tp,
        "kv": kv_per_token * tokens / tp,
        "workspace": workspace + logits,
        "overhead": CUDA_CONTEXT_BYTES + CUDA_GRAPHS_BYTES,
        "fixed": fixed,
        "total": fixed + kv_per_token * tokens / tp,
    }


def _plan_gpu(plan, req, shape, devices, weights, kv_per_token) -> None:
    """vLLM: weights and KV heads split by tensor parallelism; estimates stated in ``basis``."""
    if devices.count % req.instances:
        raise ValueError(f"{devices.count} GPUs cannot be split into {req.instances} instances")
    tp = devices.count // req.instances
    valid = valid_tp_sizes(shape, devices.count)
    tokens = req.context * req.concurrency
    capacity = devices.bytes_each * (1 - req.headroom)
    one = _gpu_instance(shape, weights, kv_per_token, tokens, req.concurrency, tp)
    layouts = []
    for size in valid:
        if devices.count % size:
            continue
        lay = _gpu_instance(shape, weights, kv_per_token, tokens, req.concurrency, size)
        per_seq = kv_per_token * req.context / size
        room = capacity - lay["fixed"]
        layouts.append(
            {
                "instances": devices.count // size,
                "tensor_parallel": size,
                "per_device_bytes": int(lay["total"]),
                "fits": lay["total"] <= capacity,
                "max_concurrency": max(0, int(room // per_seq)) if per_seq else 0,
            }
        )
    host = _round_up(weights + 4 * GiB + 2 * GiB * tp, GiB)
    plan["basis"].update(
        {
            "weights": "split evenly over the tensor-parallel GPUs",
            "kv": "context x concurrency, KV heads split over the tensor-parallel GPUs",
            "workspace": f"estimate: {VLLM_BATCHED_TOKENS} batched tokens x (4 x hidden + "
            "2 x intermediate / tp) x 2 bytes + concurrency x vocab x 4 bytes of logits",
            "overhead": "estimate: CUDA context and NCCL 0.75 GiB + CUDA graphs 0.5 GiB per GPU",
            "host": "weights (loaded through host memory) + 4 GiB for the API process + 2 GiB "
            "per GPU worker",
            "shm": "NCCL between tensor-parallel workers: 2 GiB per GPU",
        }
    )
    if tp not in valid:
        plan.setdefault("warnings", []).append(
            f"tensor parallel {tp} does not divide {shape.heads} attention heads and "
            f"{shape.kv_heads} KV heads; valid sizes: {valid}"
        )
    plan.update(
        {
            "engine": "vllm",
            "kv_tokens": tokens,
            "kv_bytes_total": kv_per_token * tokens,
            "workspace_bytes": int(one["workspace"]),
            "overhead_bytes": int(one["overhead"]),
            "total_bytes": int(one["total"] * tp),
            "per_device_bytes": int(one["total"]),
            "fits": tp in valid and one["total"] <= capacity,
            "gpu_memory_utilization": round(min(0.95, 1 - req.headroom), 2),
            "tensor_parallel": {"size": tp, "valid_sizes": valid},
            "layouts": layouts,
            "host": {
                "memory_limit_bytes": host * req.instances,
                "cpus": (2 * tp + 2) * req.instances,
                "shm_bytes": 2 * GiB * tp if tp > 1 else 1 * GiB,
            },
            "server": _server_settings(req, host, host),
        }
    )
