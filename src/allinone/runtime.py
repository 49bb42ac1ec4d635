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


def decision_strategy_for(settings: Settings) -> dict[str, str]:
    """The configured model's own decision strategy per question kind ("*": the rest), from
    the catalog; empty for the server default."""
    entry = get_entry(settings.model.model)
    return dict(entry.decision_strategy) if entry else {}


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


def make_transcriber(settings: Settings):
    """Fetch (or re-verify: every file is hashed) the configured speech model and load it.
    ModelFetchError for an unknown name or a bad file; ImportError when the speech packages
    (requirements-speech.txt) are not installed."""
    from allinone.models import ModelFetchError
    from allinone.models.speech import fetch_speech, get_speech_entry, verify_speech
    from allinone.speech.transcriber import Transcriber

    cfg = settings.speech
    entry = get_speech_entry(cfg.speech_model)
    if entry is None:
        raise ModelFetchError(
            f"unknown speech model {cfg.speech_model!r}: use whisper-base or whisper-tiny.en"
        )
    cache = settings.model.cache_dir
    download = settings.model.download
    folder = fetch_speech(entry, cache) if download else verify_speech(entry, cache)
    return Transcriber(
        folder,
        entry.name,
        entry.multilingual,
        threads=cfg.speech_threads,
        beam_size=cfg.speech_beam_size,
        detect_languages=tuple(cfg.speech_languages),
    )
