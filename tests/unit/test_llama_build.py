"""The host probes that decide which instruction-set extensions llama.cpp is built with.

No AMX host is needed: ``ud2`` traps on every x86-64 CPU, exactly as an AMX tile load does on a
guest whose hypervisor lists AMX but does not run it.
"""

from __future__ import annotations

import json
import platform
import shutil
import stat

import pytest

from allinone import llama_build as lb

x86_only = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64") or shutil.which("cc") is None,
    reason="the probes are x86-64 inline assembly built with cc",
)

TRAPS = lb.Probe(
    name="always_traps",
    macro=None,
    cflags=(),
    disable=("-mno-fake-trap",),
    source='int main(void){ __asm__ volatile("ud2"); return 0; }\n',
    system_info="FAKE_TRAP",
)
RUNS = lb.Probe(
    name="always_runs",
    macro=None,
    cflags=(),
    disable=("-mno-fake-run",),
    source='int main(void){ __asm__ volatile("nop"); return 0; }\n',
    system_info="FAKE_RUN",
)
PROBES = (TRAPS, RUNS)


@x86_only
def test_a_probe_that_traps_is_unsafe_and_its_flag_is_dropped_one_that_runs_is_kept(tmp_path):
    results = [lb.run_probe(p, "cc", tmp_path) for p in PROBES]
    assert [(r.name, r.status) for r in results] == [
        ("always_traps", "traps"),
        ("always_runs", "runs"),
    ]
    assert lb.disabled_flags(results, PROBES) == ["-mno-fake-trap"]
    assert lb.unsafe_system_info(results, PROBES) == ["FAKE_TRAP"]


@x86_only
def test_a_probe_native_would_not_enable_is_skipped_without_running(tmp_path):
    probe = lb.Probe("never_native", "__NO_SUCH_MACRO__", (), ("-mno-x",), "int main(void){}")
    result = lb.run_probe(probe, "cc", tmp_path, macros={"__AVX2__"})
    assert result.status == "skipped"
    assert lb.disabled_flags([result], (probe,)) == []


@x86_only
def test_an_extension_the_compiler_cannot_emit_is_unbuildable_not_unsafe(tmp_path):
    probe = lb.Probe("bad", None, ("-mno-such-flag-anywhere",), ("-mno-y",), "int main(void){}")
    result = lb.run_probe(probe, "cc", tmp_path)
    assert result.status == "unbuildable"
    assert lb.disabled_flags([result], (probe,)) == []


@x86_only
def test_every_real_probe_compiles_and_gives_a_verdict(tmp_path):
    # On this host each extension either runs or traps (or the compiler is too old for it);
    # none may fail in another way, which would mean a broken probe program.
    for probe in lb.PROBES:
        result = lb.run_probe(probe, lb.compiler(), tmp_path)
        assert result.status in ("runs", "traps", "unbuildable"), (probe.name, result)


def test_the_native_plan_switches_off_what_trapped_and_the_key_follows_the_flags(monkeypatch):
    monkeypatch.delenv("ALLINONE_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("ALLINONE_LLAMA_CFLAGS", raising=False)
    amx = lb.ProbeResult("amx_int8", "traps")
    bf16 = lb.ProbeResult("avx512_bf16", "runs")
    plan = lb.make_plan("0.3.36", "native", [amx, bf16])
    assert plan.cmake_args == "-DGGML_NATIVE=ON"
    assert plan.cflags.split() == ["-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16"]
    assert plan.unsafe == ["AMX_INT8"]
    clean = lb.make_plan("0.3.36", "native", [bf16])
    host = {"machine": "x86_64", "cpu": "test", "flags": "avx2"}
    assert plan.key(host, "gcc 12") != clean.key(host, "gcc 12")
    assert plan.key(host, "gcc 12") != plan.key({**host, "flags": "avx2 amx_tile"}, "gcc 12")
    assert plan.key(host, "gcc 12").startswith("0.3.36-native-")


def test_the_conservative_plan_has_no_native_avx512_or_amx(monkeypatch):
    monkeypatch.delenv("ALLINONE_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("ALLINONE_LLAMA_CFLAGS", raising=False)
    monkeypatch.setattr(lb.platform, "machine", lambda: "x86_64")
    plan = lb.make_plan("0.3.36", "conservative", [])
    assert "-DGGML_NATIVE=OFF" in plan.cmake_args and "-DGGML_AVX512=OFF" in plan.cmake_args
    assert "-DGGML_AMX_INT8=OFF" in plan.cmake_args
    assert {"AMX_INT8", "AVX512"} <= set(plan.unsafe)


def test_environment_overrides_replace_the_probed_flags(monkeypatch):
    monkeypatch.setenv("ALLINONE_LLAMA_CMAKE_ARGS", "-DGGML_NATIVE=OFF -DGGML_AVX2=ON")
    monkeypatch.setenv("ALLINONE_LLAMA_CFLAGS", "-mno-avx512f")
    plan = lb.make_plan("0.3.36", "native", [lb.ProbeResult("amx_int8", "traps")])
    assert plan.mode == "override"
    assert plan.cmake_args == "-DGGML_NATIVE=OFF -DGGML_AVX2=ON"
    assert plan.cflags == "-mno-avx512f"


@x86_only
def test_a_smoke_test_that_dies_of_sigill_is_reported_not_suffered(tmp_path):
    # A "python" that traps at once stands for a library that traps at its first decode.
    src = tmp_path / "trap.c"
    src.write_text(TRAPS.source)
    exe = tmp_path / "trap"
    assert lb.subprocess.run(["cc", str(src), "-o", str(exe)]).returncode == 0
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    result = lb.run_smoke(str(exe), tmp_path / "model.gguf")
    assert not result.ok and "SIGILL" in result.message


def test_the_smoke_test_refuses_a_library_built_with_an_unsafe_extension(tmp_path):
    # A child that "decodes" fine but reports AMX_INT8 = 1: the -mno flags did not take.
    fake = tmp_path / "fake_python"
    info = json.dumps({"system_info": "CPU : AVX2 = 1 | AMX_INT8 = 1 |"})
    fake.write_text(f"#!/bin/sh\necho '{info}'\necho '{json.dumps({'ok': True})}'\n")
    fake.chmod(0o755)
    bad = lb.run_smoke(str(fake), tmp_path / "m.gguf", unsafe=["AMX_INT8"])
    assert not bad.ok and "AMX_INT8" in bad.message
    good = lb.run_smoke(str(fake), tmp_path / "m.gguf", unsafe=["AVX512_BF16"])
    assert good.ok
