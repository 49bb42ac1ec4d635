"""Model shapes: the numbers from a model's config.json that decide its memory.

A catalog of public configs works offline; any other model is read from its config.json or
from its GGUF metadata.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class ModelShape:
    """Transformer dimensions (names follow Hugging Face config.json)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied_embeddings: bool
    head_dim: int = 0
    context: int = 32768
    qkv_bias: bool = True  # Qwen2 has biases on q, k, v

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden // self.heads)

    # -- parameter counts per tensor group ------------------------------------------------
    def embedding_params(self) -> int:
        """Token embeddings (and the output head when it is a separate matrix)."""
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def attention_params_per_layer(self) -> int:
        q = self.hidden * self.heads * self.head_dim
        kv = 2 * self.hidden * self.kv_heads * self.head_dim
        o = self.heads * self.head_dim * self.hidden
        bias = (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o + bias

    def mlp_params_per_layer(self) -> int:
        """Gated MLP: gate, up and down projections."""
        return 3 * self.hidden * self.intermediate

    def norm_params(self) -> int:
        """Two RMSNorms per layer plus the final one (kept in full precision)."""
        return (2 * self.layers + 1) * self.hidden

    def linear_params(self) -> int:
        """Parameters of the quantisable matrices of all layers."""
        return self.layers * (self.attention_params_per_layer() + self.mlp_params_per_layer())

    def total_params(self) -> int:
        """Every parameter."""
        return self.embedding_params() + self.linear_params() + self.norm_params()

    def kv_bytes_per_token(self, bytes_per_element: float) -> float:
        """2 (K and V) x layers x KV heads x head_dim x bytes per element."""
        return 2 * self.layers * self.kv_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict:
        """The shape with its parameter count."""
        return {**asdict(self), "params": self.total_params()}


# Public config.json values (see each model's card).
SHAPES: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape(
            "Qwen2.5-0.5B-Instruct",
            hidden=896,
            layers=24,
            heads=14,
            kv_heads=2,
            head_dim=64,
            intermediate=4864,
            vocab=151936,
            tied_embeddings=True,
        ),
        ModelShape(
            "Qwen2.5-1.5B-Instruct",
            hidden=1536,
            layers=28,
            heads=12,
            kv_heads=2,
            intermediate=8960,
            vocab=151936,
            tied_embeddings=True,
        ),
        ModelShape(
            "Qwen2.5-7B-Instruct",
            hidden=3584,
            layers=28,
            heads=28,
            kv_heads=4,
            head_dim=128,
            intermediate=18944,
            vocab=152064,
            tied_embeddings=False,
            context=32768,
        ),
        ModelShape(
            "Qwen1.5-0.5B-Chat",
            hidden=1024,
            layers=24,
            heads=16,
            kv_heads=16,
            intermediate=2816,
            vocab=151936,
            tied_embeddings=False,
        ),
    )
}
# The Coder models share their base models' shapes.
for _base in ("0.5B", "1.5B"):
    _coder = replace(SHAPES[f"Qwen2.5-{_base}-Instruct"], name=f"Qwen2.5-Coder-{_base}-Instruct")
    SHAPES[_coder.name] = _coder
# Catalog model names of this project -> their shapes.
ALIASES = {
    "default": "Qwen2.5-Coder-0.5B-Instruct",
    "qwen2.5-coder-0.5b-instruct-q4_k_m": "Qwen2.5-Coder-0.5B-Instruct",
    "accurate": "Qwen2.5-Coder-1.5B-Instruct",
    "qwen2.5-coder-1.5b-instruct-q4_k_m": "Qwen2.5-Coder-1.5B-Instruct",
}


def shape_from_config(path: Path) -> ModelShape:
    """A shape from a Hugging Face config.json."""
    cfg = json.loads(Path(path).read_text(encoding="utf-8"))
    heads = cfg["num_attention_heads"]
    return ModelShape(
        name=cfg.get("_name_or_path") or Path(path).parent.name or "model",
        hidden=cfg["hidden_size"],
        layers=cfg["num_hidden_layers"],
        heads=heads,
        kv_heads=cfg.get("num_key_value_heads", heads),
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        intermediate=cfg["intermediate_size"],
        vocab=cfg["vocab_size"],
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        context=cfg.get("max_position_embeddings", 32768),
        qkv_bias=cfg.get("model_type", "qwen2") == "qwen2",
    )


def shape_from_gguf(path: Path) -> ModelShape:
    """A shape from a GGUF file's metadata (read with the `gguf` package)."""
    try:
        from gguf import GGUFReader
    except ImportError as exc:  # pragma: no cover - optional
        raise ValueError("reading GGUF metadata needs the `gguf` package") from exc
    reader = GGUFReader(str(path))

    def field(key: str):
        f = reader.fields.get(key)
        if f is None:
            return None
        return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else None

    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    hidden = field(f"{arch}.embedding_length")
    heads = field(f"{arch}.attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = next(t.shape for t in reader.tensors if t.name == "token_embd.weight")[-1]
    return ModelShape(
        name=Path(path).stem,
        hidden=hidden,
        layers=field(f"{arch}.block_count"),
        heads=heads,
        kv_heads=field(f"{arch}.attention.head_count_kv") or heads,
        intermediate=field(f"{arch}.feed_forward_length"),
        vocab=int(vocab),
        tied_embeddings="output.weight" not in names,
        context=field(f"{arch}.context_length") or 32768,
    )


def resolve_shape(model: str) -> ModelShape:
    """A catalog name/alias, a config.json path, or a GGUF path."""
    key = ALIASES.get(model, model)
    if key in SHAPES:
        return SHAPES[key]
    lowered = {k.lower(): v for k, v in SHAPES.items()}
    if key.lower() in lowered:
        return lowered[key.lower()]
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".json":
        return shape_from_config(path)
    if path.is_file() and path.suffix == ".gguf":
        return shape_from_gguf(path)
    if path.is_dir() and (path / "config.json").is_file():
        return shape_from_config(path / "config.json")
    raise ValueError(
        f"unknown model {model!r}: give one of {', '.join(sorted(SHAPES))}, a config.json or a "
        "GGUF file"
    )
