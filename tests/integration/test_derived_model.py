"""The fast-classify model: made here from the default GGUF, verified, and as accurate."""

import os
from dataclasses import replace

import pytest

from allinone.models import ModelFetchError, get_entry
from allinone.models import fetch as fetching

CLEAR = [
    ("这家酒店服务很好，环境也不错", "正面"),
    ("房间干净整洁，服务员态度热情，下次还会再来。", "正面"),
    ("等了一个小时才上菜，服务员还爱答不理，再也不来了。", "负面"),
    ("质量太差，用了两天就坏了，客服也不处理。", "负面"),
]


@pytest.fixture(scope="module")
def derived_cache(tmp_path_factory, default_model_path):
    """A cache holding only the default model (linked), from which fast-classify is derived."""
    cache = tmp_path_factory.mktemp("cache")
    base = get_entry("default")
    dest = fetching.model_path(base, cache)
    dest.parent.mkdir(parents=True)
    os.symlink(default_model_path, dest)
    fetching.verify(base, cache)
    return cache


def test_fast_classify_is_derived_and_verified(derived_cache):
    entry = get_entry("fast-classify")
    assert not fetching.is_present(entry, derived_cache)
    path = fetching.fetch(entry, derived_cache)
    assert path.stat().st_size == entry.size
    assert fetching.is_present(entry, derived_cache)
    assert fetching.fetch(entry, derived_cache) == path  # a second fetch is a no-op
    fetching.verify(entry, derived_cache)  # re-hash: the catalog's sha256


def test_a_derived_file_that_does_not_match_is_not_installed(derived_cache):
    entry = replace(get_entry("fast-classify"), filename="other.gguf", sha256="0" * 64)
    with pytest.raises(ModelFetchError, match=r"requirements\.txt"):
        fetching.fetch(entry, derived_cache)
    assert not fetching.model_path(entry, derived_cache).exists()
    assert not list(fetching.model_path(entry, derived_cache).parent.glob(".derive-*"))


def test_fast_classify_labels_like_the_default(derived_cache, service):
    from allinone.backends.llama_cpp import LlamaCppBackend
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    path = fetching.fetch(get_entry("fast-classify"), derived_cache)
    backend = LlamaCppBackend(path, EngineSettings(threads=2, parallel=2), "fast")
    backend.load()
    try:
        fast = TaskService(backend, TaskRegistry.load()).classify(
            "sentiment", [t for t, _ in CLEAR]
        )
    finally:
        backend.close()
    default = service.classify("sentiment", [t for t, _ in CLEAR])
    for (text, label), f, d in zip(CLEAR, fast, default, strict=True):
        assert f.label == label, (text, f.scores)
        # BF16 holds the same weights; only rounding in the kernels differs.
        assert abs(f.scores[label] - d.scores[label]) < 0.05, (text, f.scores, d.scores)
