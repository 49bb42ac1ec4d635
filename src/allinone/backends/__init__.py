"""Backends run the model; the registry maps a name to its class (imports stay lazy)."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from allinone.backends.base import Backend

_REGISTRY: dict[str, str] = {
    "llama_cpp": "allinone.backends.llama_cpp:LlamaCppBackend",
    "openai": "allinone.backends.remote:OpenAIRemoteBackend",
    "transformers": "allinone.backends.transformers_backend:TransformersBackend",
    "vllm": "allinone.backends.vllm_backend:VLLMBackend",
}


def get_backend_class(name: str) -> Callable[..., Backend]:
    """The backend class registered as ``name``; ValueError lists the valid names."""
    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; valid backends: {', '.join(sorted(_REGISTRY))}"
        ) from None
    module, attr = target.split(":")
    return getattr(importlib.import_module(module), attr)


def backend_names() -> list[str]:
    """Names of all registered backends."""
    return sorted(_REGISTRY)
