"""Where weights come from: the catalog of known models and their fetch/verify/cache logic."""

from allinone.models.catalog import CATALOG, DEFAULT_MODEL, ModelEntry, get_entry
from allinone.models.fetch import ModelFetchError, ensure_model, resolve_model_path

__all__ = [
    "CATALOG",
    "DEFAULT_MODEL",
    "ModelEntry",
    "ModelFetchError",
    "ensure_model",
    "get_entry",
    "resolve_model_path",
]
