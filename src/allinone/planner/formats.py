"""Weight formats: bytes of every tensor group of a model shape in a given storage format.

GGUF formats follow llama.cpp's own choices (``llama_tensor_get_type``): Q4_K_M keeps half of
the layers' ``attn_v`` and ``ffn_down`` at Q6_K and the output head at Q6_K, and a K-quant whose
row length is not a multiple of 256 falls back to a legacy quant (Q4_K -> Q5_0, Q6_K -> Q8_0).
That fallback is why the default 0.5B GGUF (hidden size 896) averages ~8 bits per weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from allinone.planner.shapes import ModelShape

# Bytes per block / weights per block of each GGUF type, as bits per weight.
GGUF_BITS = {
    "F32": 32.0,
    "F16": 16.0,
    "BF16": 16.0,
    "Q8_0": 34 * 8 / 32,
    "Q6_K": 210 * 8 / 256,
    "Q5_0": 22 * 8 / 32,
    "Q4_K": 144 * 8 / 256,
    "Q4_0": 18 * 8 / 32,
}
_K_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}
# llama.cpp repacks these types into an interleaved copy for AVX2/NEON matrix kernels (its
# CPU_REPACK buffer); the mapped file pages stay resident too, so they count twice.
REPACKED_TYPES = {"Q4_0", "Q4_K", "IQ4_NL"}
# Group size of GPTQ/AWQ int4: a 16-bit scale and a 4-bit zero point per 128 weights.
_INT4_BITS = 4 + (16 + 4) / 128
# GGUF metadata is mostly the tokenizer: ~39 bytes per vocabulary entry in the catalog files.
GGUF_METADATA_BYTES_PER_TOKEN = 39

DTYPES = ("fp32", "bf16", "fp16", "q8_0", "q4_k_m", "gptq-int4", "awq-int4")
KV_DTYPES = {"fp16": 2.0, "fp8": 1.0, "q8_0": 34 / 32}


@dataclass(frozen=True)
class Tensor:
    """One stored tensor: its group, element count, row length and storage type."""

    group: str
    params: int
    row: int
    kind: str  # a GGUF type name, or fp32/fp16/bf16/int4


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's use_more_bits: the first and last eighth of the layers, every third between."""
    eighth = layers // 8
    return layer < eighth or layer >= 7 * layers // 8 or (layer - eighth) % 3 == 2


def _gguf_type(kind: str, row: int) -> str:
    if kind in _K_FALLBACK and row % 256:
        return _K_FALLBACK[kind]
    return kind


def tensors(shape: ModelShape, dtype: str) -> list[Tensor]:
    """Every tensor of ``shape`` stored in ``dtype``."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; valid: {', '.join(DTYPES)}")
    h, hd, i_ = shape.hidden, shape.head_dim, shape.intermediate
    q_out, kv_out = shape.heads * hd, shape.kv_heads * hd
    gguf = dtype in ("q8_0", "q4_k_m")
    int4 = dtype in ("gptq-int4", "awq-int4")
    dense = {"fp32": "F32", "bf16": "BF16", "fp16": "F16"}.get(dtype, "F16")
    small = "F32" if gguf else dense  # norms and biases

    def mat(group: str, rows: int, row: int, k_type: str) -> Tensor:
        if dtype == "q4_k_m":
            kind = _gguf_type(k_type, row)
        elif dtype == "q8_0":
            kind = "Q8_0"
        elif int4:
            kind = "INT4"
        else:
            kind = dense
        return Tensor(group, rows * row, row, kind)

    out: list[Tensor] = []
    embd_kind = dense if not gguf else ("Q8_0" if dtype == "q8_0" else _gguf_type("Q4_K", h))
    out.append(Tensor("embeddings", shape.vocab * h, h, embd_kind))
    # GGUF files store the output head even for tied models (both catalog files do); Hugging Face
    # checkpoints of tied models do not.
    if gguf or not shape.tied_embeddings:
        head_kind = dense if not gguf else ("Q8_0" if dtype == "q8_0" else _gguf_type("Q6_K", h))
        out.append(Tensor("output_head", shape.vocab * h, h, head_kind))
    for layer in range(shape.layers):
        more = _more_bits(layer, shape.layers)
        out += [
            mat("attention", q_out, h, "Q4_K"),
            mat("attention", kv_out, h, "Q4_K"),
            mat("attention", kv_out, h, "Q6_K" if more else "Q4_K"),
            mat("attention", h, q_out, "Q4_K"),
            mat("mlp", i_, h, "Q4_K"),
            mat("mlp", i_, h, "Q4_K"),
            mat("mlp", h, i_, "Q6_K" if more else "Q4_K"),
            Tensor("norms_biases", 2 * h, h, small),
        ]
        if shape.qkv_bias:
            out.append(Tensor("norms_biases", q_out + 2 * kv_out, q_out, small))
    out.append(Tensor("norms_biases", h, h, small))
    return out


def tensor_bytes(t: Tensor) -> int:
    """Bytes of one tensor, scales and zero points included."""
    bits = _INT4_BITS if t.kind == "INT4" else GGUF_BITS[t.kind.upper()]
    return round(t.params * bits / 8)


def weight_groups(shape: ModelShape, dtype: str) -> dict[str, int]:
    """Bytes per tensor group (embeddings, output_head, attention, mlp, norms_biases)."""
    groups: dict[str, int] = {}
    for t in tensors(shape, dtype):
        groups[t.group] = groups.get(t.group, 0) + tensor_bytes(t)
    return groups


def repacked_bytes(shape: ModelShape, dtype: str) -> int:
    """Bytes llama.cpp copies into its CPU_REPACK buffer (token embeddings are looked up, never
    multiplied, so they are not repacked)."""
    return sum(
        tensor_bytes(t)
        for t in tensors(shape, dtype)
        if t.kind in REPACKED_TYPES and t.group != "embeddings"
    )


@dataclass(frozen=True)
class GGUFWeights:
    """Weights as stored in a real GGUF file."""

    file_bytes: int
    tensor_bytes: int
    groups: dict[str, int]
    repacked_bytes: int


def gguf_weights(path: Path) -> GGUFWeights:
    """Exact sizes from a GGUF file's tensor table."""
    from gguf import GGUFReader

    reader = GGUFReader(str(path))
    groups: dict[str, int] = {}
    repacked = 0
    for t in reader.tensors:
        name, n = t.name, int(t.n_bytes)
        if name == "token_embd.weight":
            group = "embeddings"
        elif name == "output.weight":
            group = "output_head"
        elif "norm" in name or name.endswith(".bias"):
            group = "norms_biases"
        elif ".attn_" in name:
            group = "attention"
        else:
            group = "mlp"
        groups[group] = groups.get(group, 0) + n
        if t.tensor_type.name in REPACKED_TYPES and group != "embeddings":
            repacked += n
    return GGUFWeights(Path(path).stat().st_size, sum(groups.values()), groups, repacked)
