"""The plan as text for a terminal."""

from __future__ import annotations

from allinone.planner.plan import GiB, MiB


def _size(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def format_plan(plan: dict) -> str:
    """Human-readable lines for one plan (the same numbers as ``--json``)."""
    s = plan["shape"]
    out = [
        f"model      {plan['model']}  ({s['params'] / 1e9:.2f}B params, {s['layers']} layers, "
        f"{s['heads']} heads / {s['kv_heads']} KV heads x {s['head_dim']})",
        f"format     weights {plan['dtype']}, KV cache {plan['kv_dtype']}; engine {plan['engine']}",
        f"asked      context {plan['context']} x {plan['concurrency']} sequences, "
        f"{plan['instances']} instance(s) on {plan['devices']['label']}, headroom "
        f"{plan['headroom']:.0%}",
        "",
        "per instance",
        f"  weights            {_size(plan['weights_bytes'])}",
    ]
    for group, n in plan["weights_groups"].items():
        out.append(f"    {group:<16} {_size(n)}")
    out += [
        f"  KV per token       {plan['kv_bytes_per_token'] / 1024:.1f} KiB "
        f"(full multi-head attention: {plan['kv_bytes_per_token_mha'] / 1024:.1f} KiB, "
        f"GQA saves {plan['gqa_saving']:.0f}x)",
        f"  KV cache           {_size(plan['kv_bytes_total'])} for {plan['kv_tokens']} tokens",
    ]
    for key in (
        "repacked_bytes",
        "output_buffer_bytes",
        "workspace_bytes",
        "overhead_bytes",
        "prompt_cache_bytes",
    ):
        if key in plan:
            out.append(f"  {key.removesuffix('_bytes').replace('_', ' '):<18} {_size(plan[key])}")
    out.append(f"  total              {_size(plan['total_bytes'])}")
    if "predicted_rss" in plan:
        p = plan["predicted_rss"]
        out.append(
            f"  predicted RSS      {_size(p['after_load'])} after load, "
            f"{_size(p['after_fill'])} with every sequence's context full"
        )
    out.append(
        f"  per device         {_size(plan['per_device_bytes'])} of "
        f"{_size(plan['devices']['bytes_each'])} -> {'fits' if plan['fits'] else 'DOES NOT FIT'}"
    )
    tp = plan["tensor_parallel"]
    out.append(f"  tensor parallel    {tp['size']} (valid sizes: {tp['valid_sizes']})")
    if plan["layouts"]:
        out += ["", "layouts (instances x GPUs each)"]
        for lay in plan["layouts"]:
            out.append(
                f"  {lay['instances']}x{lay['tensor_parallel']}  "
                f"{_size(lay['per_device_bytes'])} per GPU  "
                f"{'fits' if lay['fits'] else 'does not fit'}  "
                f"max concurrency at this context: {lay['max_concurrency']}"
            )
    h = plan["host"]
    out += [
        "",
        f"ask for     memory {_size(h['memory_limit_bytes'])}, {h['cpus']} CPUs, "
        f"shm {_size(h['shm_bytes'])}",
    ]
    srv = plan["server"]
    out.append(
        f"server      parallel {srv['parallel']}, ctx_per_seq {srv['ctx_per_seq']}, memory "
        f"soft {srv['memory_soft_limit_mb']} MB / hard {srv['memory_hard_limit_mb']} MB"
    )
    for w in plan.get("warnings", []):
        out.append(f"warning     {w}")
    out += ["", "basis"] + [f"  {k}: {v}" for k, v in plan["basis"].items()]
    return "\n".join(out)
