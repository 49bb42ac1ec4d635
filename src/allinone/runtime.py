"""Wiring: from settings to a constructed (not yet loaded) backend."""

from __future__ import annotations

from pathlib import Path

from allinone.backends import get_backend_class
from allinone.backends.base import Backend
from allinone.models import ensure_model, get_entry
from allinone.settings import Settings


def model_id_for(settings: Settings, path: Path) -> str:
    """The id the API reports: the setting, the catalog name, or the file's stem."""
    if settings.model.model_id:
        return settings.model.model_id
    entry = get_entry(settings.model.model)
    return entry.name if entry else path.stem


def make_backend(settings: Settings) -> Backend:
    """Resolve (and fetch if allowed) the model, then construct the configured backend."""
    if settings.model.backend == "openai":  # the model lives in the upstream server
        return get_backend_class("openai")(settings.model, settings.engine)
    folder = Path(settings.model.model).expanduser()
    if settings.model.backend in ("transformers", "vllm") and folder.is_dir():
        # Hugging Face model folders: the engines that read them take the folder as it is.
        model_id = settings.model.model_id or folder.name
        return get_backend_class(settings.model.backend)(folder, settings.engine, model_id)
    path = ensure_model(
        settings.model.model, cache_dir=settings.model.cache_dir, download=settings.model.download
    )
    cls = get_backend_class(settings.model.backend)
    return cls(path, settings.engine, model_id_for(settings, path))
