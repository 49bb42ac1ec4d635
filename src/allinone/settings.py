"""Settings, one pydantic-settings class per concern. Precedence: flag > env > .env file > default.

Every field can be set from the environment with the ``ALLINONE_`` prefix, e.g.
``ALLINONE_PARALLEL=8`` or ``ALLINONE_MODEL=/models/my.gguf``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from allinone.cpu_budget import cpu_budget
from allinone.models.catalog import DEFAULT_MODEL
from allinone.models.fetch import default_cache_dir

# ALLINONE_ENV_FILE moves (or, set to /dev/null, disables) the .env file; the tests do that so a
# developer's .env cannot change their results.
_COMMON = SettingsConfigDict(
    env_prefix="ALLINONE_", env_file=os.environ.get("ALLINONE_ENV_FILE", ".env"), extra="ignore"
)


def _default_threads() -> int:
    # llama.cpp decode is memory-bound; one thread per CPU this process may use is best: its
    # affinity mask, capped by a container's CPU quota (cpu_budget).
    return cpu_budget().count


class ModelSettings(BaseSettings):
    """Which model to load and where models are cached."""

    model_config = _COMMON
    model: str = Field(DEFAULT_MODEL, description="Catalog name/alias or path to a GGUF file")
    model_id: str | None = Field(None, description="Id the API reports; default: the model's name")
    backend: str = Field(
        "llama_cpp",
        description="Engine that runs the model: llama_cpp, transformers, vllm or "
        "openai (a remote OpenAI-compatible server)",
    )
    cache_dir: Path = Field(
        default_factory=default_cache_dir,
        description="Where fetched models, wheels and start-up checks are kept",
    )
    download: bool = Field(True, description="Fetch a catalog model that is not cached yet")
    # The `openai` backend: the model runs in another OpenAI-compatible server.
    upstream: str | None = Field(None, description="Base URL of an OpenAI-compatible server")
    upstream_model: str | None = Field(None, description="Upstream model id (default: its first)")
    upstream_api_key: str | None = Field(None, description="Bearer key for the upstream")
    upstream_timeout_s: float = Field(60.0, gt=0, le=3600, description="Upstream request timeout")
    choice_mode: Literal["auto", "vllm", "grammar", "logprobs", "parse"] = Field(
        "auto", description="How the upstream is constrained to a label (auto: by server kind)"
    )
    chat_template: Path | None = Field(
        None, description="Jinja chat template for the upstream model (default: ChatML)"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        # Checked when the settings are read, so a typo stops `serve` at once with the list,
        # instead of a loader thread failing after the server started.
        from allinone.backends import backend_names

        if v not in backend_names():
            raise ValueError(f"unknown backend {v!r}; valid backends: {', '.join(backend_names())}")
        return v


class EngineSettings(BaseSettings):
    """How the engine runs the model: threads, parallel sequences, context per sequence."""

    model_config = _COMMON
    threads: int = Field(
        default_factory=_default_threads, ge=1, le=512, description="CPU threads for llama.cpp"
    )
    parallel: int = Field(4, ge=1, le=64, description="Sequences decoded together per step")
    ctx_per_seq: int = Field(
        2048, ge=128, le=131072, description="Tokens of context each sequence may use"
    )
    n_batch: int = Field(512, ge=16, le=8192, description="Most tokens evaluated in one step")
    prefix_cache_size: int = Field(
        8, ge=0, le=64, description="Task prefixes kept as shared KV-cache sequences"
    )
    prefix_cache_tokens: int = Field(
        4096, ge=0, le=65536, description="KV cells reserved for cached prefixes in total"
    )
    max_choices: int = Field(
        16,
        ge=2,
        le=64,
        description="Most labels a classify task may have; also sizes the scratch sequences "
        "that decision questions and long labels use (parallel x max_choices)",
    )
    reuse_slots: bool = Field(
        True,
        description="Start a chat's next turn from its earlier turns' KV cells (restored from "
        "host memory; kept in its sequence when the prompt cache is off), so it evaluates only "
        "its new tokens",
    )
    prompt_cache_mb: int = Field(
        128,
        ge=0,
        le=1048576,
        description="Host memory for finished chats' KV cells, restored when a conversation "
        "returns (0: off; finished chats then keep their cells in their sequences)",
    )
    max_queue: int = Field(
        1024,
        ge=1,
        le=100000,
        description="Requests (list items count one each) waiting for a "
        "sequence; more are refused with 503",
    )
    grammar_prewarm: bool = Field(
        True,
        description="Build the grammar engine's view of the vocabulary at start-up (seconds, "
        "~60 MB on a 152k vocabulary) instead of on the first structured-output request",
    )
    seed: int | None = Field(
        None,
        description="Sampling seed for requests that send none (default: a fresh seed per "
        "request, so unseeded samples differ; set one only to make tests repeat)",
    )
    host_check: bool = Field(
        True,
        description="Before loading, decode a 64-token prompt in a child process to prove "
        "llama.cpp runs on this CPU (remembered per library, host and model)",
    )
    # vllm backend only
    tensor_parallel: int = Field(1, ge=1, le=64, description="vllm: GPUs per model instance")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="vllm: share of each GPU's memory the engine may use"
    )


class ServerSettings(BaseSettings):
    """The HTTP server: address, limits on requests, task files."""

    model_config = _COMMON
    host: str = Field("127.0.0.1", description="Address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="Port to listen on")
    tasks_dir: list[Path] = Field(default_factory=list, description="Extra task-file folders")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, le=1 << 30, description="Largest request body accepted (413 above)"
    )
    max_batch_inputs: int = Field(
        256, ge=1, le=10000, description="Most texts in one /v1/classify request"
    )
    decision_max_questions: int = Field(
        64, ge=1, le=400, description="Most questions in one decision request"
    )
    decision_max_options: int = Field(
        255, ge=2, le=676, description="Most options of a decision's choice question"
    )
    decision_max_levels: int = Field(
        10, ge=2, le=10, description="Most levels of a decision's score question (labels 0-9)"
    )
    decision_max_prompt_tokens: int = Field(
        16384,
        ge=64,
        le=1 << 20,
        description="Most tokens of a decision request (input + every question; 413 above)",
    )
    default_max_tokens: int = Field(
        256, ge=1, le=32768, description="Reply cap when a raw-model chat names none"
    )
    log_level: str = Field("info", description="Logging level")
    api_keys: list[str] = Field(
        default_factory=list, description="Accepted API keys (JSON list); empty = no auth"
    )
    api_key_file: Path | None = Field(None, description="File with one accepted API key a line")
    request_timeout_s: float = Field(
        120.0, gt=0, le=3600, description="A request running longer gets 504"
    )
    overload_status: int = Field(503, description="Status when the queue is full: 503 or 429")
    retry_after_s: int = Field(1, ge=0, le=3600, description="Retry-After on 503/429")
    drain_timeout_s: float = Field(
        30.0, ge=0, le=3600, description="On SIGTERM, wait this long for requests"
    )
    exit_on_fatal: bool = Field(
        True,
        description="Exit non-zero when the model cannot load (false: stay up answering 503, "
        "for debugging)",
    )
    memory_soft_limit_mb: int | None = Field(
        None, ge=1, description="Above this (RSS or anon+swap) new work gets 503"
    )
    memory_hard_limit_mb: int | None = Field(
        None, ge=1, description="Above this the process exits (code 3) to be restarted"
    )
    memory_from_cgroup: bool = Field(
        True,
        description="With neither memory limit set, derive both from the cgroup's memory limit "
        "(soft 80 %, hard 90 %; docs/operations.md#memory)",
    )
    memory_sample_s: float = Field(10.0, gt=0, le=3600, description="Memory sampling interval")
    malloc_mmap_threshold_kb: int = Field(
        256,
        ge=0,
        le=32768,
        description="glibc only: blocks at least this big are mmapped and given back when freed "
        "(fixing the threshold stops glibc raising it, which let the prompt cache's MB-sized "
        "states fragment the heap); 0 = glibc's dynamic default",
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="Browser origins allowed to call the API (JSON list, e.g. "
        '["https://app.example.com"]; "*" for any); empty = CORS off',
    )
    cors_methods: list[str] = Field(
        default_factory=lambda: ["GET", "POST", "OPTIONS"], description="CORS allowed methods"
    )
    cors_headers: list[str] = Field(
        default_factory=lambda: ["*"],
        description="CORS allowed request headers (default any: Authorization, Content-Type, "
        "the openai SDK's x-stainless-*)",
    )
    cors_credentials: bool = Field(False, description="CORS: allow cookies / credentials")
    cors_private_network: bool = Field(
        True,
        description="CORS: answer Chrome's Private Network Access preflight "
        "(Access-Control-Request-Private-Network) from the allowed origins, so a page on a public "
        "site among cors_origins may call this server on a private address; false: refuse it",
    )
    # HTTP/1.1 limits, enforced before the request reaches the app (uvicorn bounds none of them).
    max_header_bytes: int = Field(
        65536,
        ge=1024,
        le=1 << 20,
        description="Most bytes of a request's line and headers together (431 above)",
    )
    max_header_line_bytes: int = Field(
        16384,
        ge=256,
        le=1 << 20,
        description="Most bytes of one header (name and value; 431 above) or of the request "
        "target (414 above)",
    )
    max_headers: int = Field(
        100, ge=8, le=10000, description="Most header fields in one request (431 above)"
    )
    header_timeout_s: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="Seconds a client may take to send a request's line and headers, from "
        "connecting or from the request's first byte; then 408 and the connection is closed",
    )
    body_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds a client may pause while sending a request body (between two "
        "reads); then 408 and the connection is closed",
    )

    @field_validator("overload_status")
    @classmethod
    def _overload_status(cls, v: int) -> int:
        if v not in (429, 503):
            raise ValueError("overload_status must be 503 or 429")
        return v

    def all_api_keys(self) -> set[str]:
        """Keys from the setting and the key file together."""
        keys = {k for k in self.api_keys if k}
        if self.api_key_file is not None:
            lines = self.api_key_file.read_text(encoding="utf-8").splitlines()
            keys |= {line.strip() for line in lines if line.strip()}
        return keys


class SpeechSettings(BaseSettings):
    """Speech in: whether a Whisper model is loaded beside the LLM, and its limits."""

    model_config = _COMMON
    speech: bool = Field(
        False,
        description="Load a speech model and serve /v1/audio/transcriptions and "
        "/v1/audio/summaries (~350 MB more memory for whisper-base)",
    )
    speech_model: str = Field(
        "whisper-base", description="Speech model: whisper-base (multilingual) or whisper-tiny.en"
    )
    speech_threads: int = Field(
        1,
        ge=1,
        le=64,
        description="CPU threads for Whisper (it shares the cores with the LLM; one "
        "transcription runs at a time)",
    )
    speech_beam_size: int = Field(5, ge=1, le=10, description="Whisper beam width")
    speech_languages: list[str] = Field(
        default_factory=lambda: ["zh", "en"],
        description="Languages automatic detection chooses among when a request names none "
        "(JSON list of ISO 639-1 codes)",
    )
    speech_max_upload_mb: float = Field(
        25.0, gt=0, le=2048, description="Largest audio upload, MB (413 above)"
    )
    speech_max_duration_s: float = Field(
        300.0, gt=0, le=36000, description="Longest audio accepted, seconds (400 above)"
    )


class Settings:
    """All settings of one process, grouped by concern."""

    def __init__(
        self,
        model: ModelSettings | None = None,
        engine: EngineSettings | None = None,
        server: ServerSettings | None = None,
        speech: SpeechSettings | None = None,
    ) -> None:
        self.model = model or ModelSettings()
        self.engine = engine or EngineSettings()
        self.server = server or ServerSettings()
        self.speech = speech or SpeechSettings()
