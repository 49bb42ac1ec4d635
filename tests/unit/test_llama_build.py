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


NATIVE_X86 = {"__AMX_TILE__", "__AVX512F__", "__AVX2__"}


def test_the_ladder_goes_native_then_without_amx_then_without_avx512_then_conservative(
    monkeypatch,
):
    monkeypatch.delenv("ALLINONE_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("ALLINONE_LLAMA_CFLAGS", raising=False)
    monkeypatch.setattr(lb.platform, "machine", lambda: "x86_64")
    rungs = lb.ladder(NATIVE_X86)
    assert rungs == ["native", "native-no-amx", "native-no-avx512", "conservative"]
    plans = {m: lb.make_plan("0.3.36", m, [], NATIVE_X86, gcc=True) for m in rungs}
    # GCC keeps the AMX tile configuration's stores only with dead-store elimination off
    assert plans["native"].cflags.split() == list(lb.DSE_FIX) and plans["native"].unsafe == []
    assert plans["native-no-amx"].cflags.split() == [
        "-mno-amx-tile",
        "-mno-amx-int8",
        "-mno-amx-bf16",
    ]
    assert plans["native-no-amx"].unsafe == ["AMX_INT8"]
    assert plans["native-no-avx512"].cflags.split()[-1] == "-mno-avx512f"
    assert plans["native-no-avx512"].unsafe == ["AMX_INT8", "AVX512"]
    assert len({p.key({"cpu": "x"}, "gcc") for p in plans.values()}) == 4
    # clang needs no DSE flags; a CPU without AMX or AVX-512 skips the rungs that would repeat
    assert lb.make_plan("0.3.36", "native", [], NATIVE_X86, gcc=False).cflags == ""
    assert lb.ladder({"__AVX2__"}) == ["native", "conservative"]
    assert lb.make_plan("0.3.36", "native", [], {"__AVX2__"}).cflags == ""
    monkeypatch.setattr(lb.platform, "machine", lambda: "aarch64")
    assert lb.ladder(set()) == ["native", "conservative"]


def test_gdb_backtraces_are_read_to_function_names():
    bt = (
        "Thread 3 received signal SIGSEGV, Segmentation fault.\n"
        "#0  0x00007f1 in ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*) ()\n"
        "   from /x/libggml-cpu.so\n"
        "#1  ggml::cpu::amx::tensor_traits::compute_forward (this=0x1, op=0x2) at amx.cpp:12\n"
        "#2  0x00007f3 in ggml_graph_compute_thread ()\n"
    )
    assert lb.parse_backtrace(bt) == [
        "ggml_backend_amx_mul_mat(ggml_compute_params const*, ggml_tensor*)",
        "ggml::cpu::amx::tensor_traits::compute_forward",
        "ggml_graph_compute_thread",
    ]


def _gdb_can_trace() -> bool:
    """gdb is installed and may trace a child here (some containers forbid ptrace)."""
    if shutil.which("gdb") is None:
        return False
    ran = lb.subprocess.run(
        ["gdb", "-batch", "-nx", "-ex", "run", "--args", "true"], capture_output=True, text=True
    )
    return "exited normally" in ran.stdout


@x86_only
@pytest.mark.skipif(not _gdb_can_trace(), reason="gdb (allowed to trace) gives the frame")
def test_a_crashing_smoke_test_records_the_signal_and_the_failing_frame(tmp_path):
    # A "python" that dies of SIGSEGV inside a named function, as llama.cpp's AMX kernel did.
    src = tmp_path / "crash.c"
    src.write_text(
        "#include <stddef.h>\n"
        "__attribute__((noinline)) void ggml_fake_mul_mat(volatile int *p) { *p = 1; }\n"
        "int main(void) { ggml_fake_mul_mat(NULL); return 0; }\n"
    )
    exe = tmp_path / "crash"
    assert lb.subprocess.run(["cc", "-O1", str(src), "-o", str(exe)]).returncode == 0
    result = lb.run_smoke(str(exe), tmp_path / "model.gguf", backtrace=True)
    assert not result.ok and result.returncode == -11
    assert result.message.startswith("SIGSEGV (segmentation fault)")
    assert result.frames[0] == "ggml_fake_mul_mat" and "in ggml_fake_mul_mat" in result.message


def _fake_build(monkeypatch, tmp_path, outcomes):
    """ensure_wheel with the compiler and CPU faked: ``outcomes`` maps (mode, extra_bufts) to
    the smoke test's result; builds write an empty wheel file."""
    monkeypatch.delenv("ALLINONE_LLAMA_CMAKE_ARGS", raising=False)
    monkeypatch.delenv("ALLINONE_LLAMA_CFLAGS", raising=False)
    monkeypatch.setattr(lb.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(lb, "probe_host", lambda cc: [])
    monkeypatch.setattr(lb, "native_macros", lambda cc: set(NATIVE_X86))
    monkeypatch.setattr(lb, "compiler_version", lambda cc: "cc (Debian 12.2.0-14) 12.2.0")
    monkeypatch.setattr(
        lb, "host_description", lambda: {"machine": "x86_64", "cpu": "t", "flags": ""}
    )
    built = []

    def build(python, plan, out):
        built.append(plan.mode)
        if outcomes.get((plan.mode, "build")) is False:
            raise lb.subprocess.CalledProcessError(1, ["pip", "wheel"])
        wheel = out / "llama_cpp_python-0.3.36-cp311-cp311-linux_x86_64.whl"
        wheel.write_bytes(b"")
        return wheel

    def smoke(python, wheel, model, unsafe, extra_bufts=True):
        mode = next(m for m in reversed(built))
        ok = outcomes.get((mode, extra_bufts), False)
        if ok:
            return lb.SmokeResult(True, 0, "AVX512 = 1", "decoded")
        return lb.SmokeResult(False, -11, "", "SIGSEGV (segmentation fault)", ["ggml_x"])

    monkeypatch.setattr(lb, "build_wheel", build)
    monkeypatch.setattr(lb, "smoke_wheel", smoke)
    return built


def test_the_native_wheel_is_kept_with_extra_buffer_types_off_before_any_rebuild(
    monkeypatch, tmp_path
):
    built = _fake_build(monkeypatch, tmp_path, {("native", False): True})
    folder = lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf")
    doc = json.loads((folder / "build.json").read_text())
    assert built == ["native"] and doc["load"]["use_extra_bufts"] is False
    assert [(t["mode"], t["extra_bufts"], t["ok"]) for t in doc["ladder"]] == [
        ("native", True, False),
        ("native", False, True),
    ]
    assert doc["ladder"][0]["frames"] == ["ggml_x"] and doc["ladder"][0]["returncode"] == -11


def test_the_ladder_records_every_failed_rung_and_skips_them_next_time(monkeypatch, tmp_path):
    built = _fake_build(monkeypatch, tmp_path, {("native-no-avx512", True): True})
    folder = lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf")
    doc = json.loads((folder / "build.json").read_text())
    assert built == ["native", "native-no-amx", "native-no-avx512"]
    assert doc["plan"]["mode"] == "native-no-avx512" and doc["load"]["use_extra_bufts"]
    assert [t["mode"] for t in doc["ladder"]] == [
        "native",
        "native",  # the same wheel with extra buffer types off, before a rebuild
        "native-no-amx",
        "native-no-avx512",
    ]
    # a second run reuses the kept wheel and rebuilds nothing
    built.clear()
    assert lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf") == folder
    assert built == []


def test_a_rung_that_does_not_compile_is_a_failed_rung_not_the_end(monkeypatch, tmp_path):
    built = _fake_build(
        monkeypatch, tmp_path, {("native", "build"): False, ("native-no-amx", True): True}
    )
    folder = lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf")
    doc = json.loads((folder / "build.json").read_text())
    assert built == ["native", "native-no-amx"] and doc["plan"]["mode"] == "native-no-amx"
    assert doc["ladder"][0]["mode"] == "native" and "build failed" in doc["ladder"][0]["message"]


def test_a_library_with_amx_kernels_loads_without_extra_buffer_types(monkeypatch, tmp_path):
    # AMX's kernels round by batch shape (a restored conversation would continue differently
    # from a fresh one) and its repacked copies add memory: off even where they run
    built = _fake_build(monkeypatch, tmp_path, {("native", True): True})
    folder = lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf")
    record = folder / "build.json"
    doc = json.loads(record.read_text())
    assert built == ["native"] and doc["load"]["use_extra_bufts"] is False
    assert "AMX" in doc["load"]["why"]
    # a record written before this rule is brought up to it, without a rebuild
    doc["load"] = {"use_extra_bufts": True}
    record.write_text(json.dumps(doc))
    assert lb.ensure_wheel("python", tmp_path, "0.3.36", tmp_path / "m.gguf") == folder
    assert json.loads(record.read_text())["load"]["use_extra_bufts"] is False
    assert built == ["native"]
