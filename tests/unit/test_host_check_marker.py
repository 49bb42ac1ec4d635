"""A passing host check in a read-only cache (a container's model volume) still lets the server
start; only its marker is not kept. The decode itself is a stand-in here: what is tested is the
marker's handling, not llama.cpp."""

from allinone import llama_build
from allinone.backends import host_check


def test_a_passed_check_in_a_read_only_cache_is_not_an_error(tmp_path, monkeypatch):
    calls = []

    def smoke(*args, **kw):
        calls.append(args)
        return llama_build.SmokeResult(True, 0, "CPU : AVX2 = 1", "decoded")

    monkeypatch.setattr(llama_build, "run_smoke", smoke)
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "host-checks").write_text("a file where the folder would go: mkdir fails")
    assert host_check.check_library_runs(model, cache) == "CPU : AVX2 = 1"
    # nothing was kept, so the next start checks again
    assert host_check.check_library_runs(model, cache) == "CPU : AVX2 = 1"
    assert len(calls) == 2
