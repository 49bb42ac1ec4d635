"""The start-up proof that llama.cpp runs on this CPU, and what a server does when it cannot."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from allinone import llama_build
from allinone.backends import host_check
from conftest import ServerProcess


def test_the_check_decodes_a_batched_prompt_and_remembers_a_pass(tiny_model_path, tmp_path):
    info = host_check.check_library_runs(tiny_model_path, tmp_path)
    assert "AVX" in info or "NEON" in info or "CPU" in info  # llama.cpp's SIMD line
    assert len(list((tmp_path / "host-checks").iterdir())) == 1
    # A second start on the same library, host and model reads the pass instead of re-running.
    again = host_check.check_library_runs(tiny_model_path, tmp_path)
    assert again == info


def test_a_library_that_traps_stops_the_start_with_a_message_naming_cpu_and_fix(
    tiny_model_path, tmp_path, monkeypatch
):
    trapped = llama_build.SmokeResult(
        False, -4, "CPU : AVX2 = 1 | AMX_INT8 = 1 |", "SIGILL (illegal instruction) in the decode"
    )
    monkeypatch.setattr(llama_build, "run_smoke", lambda *a, **k: trapped)
    with pytest.raises(host_check.HostCheckError) as err:
        host_check.check_library_runs(tiny_model_path, tmp_path)
    msg = str(err.value)
    assert "SIGILL" in msg and "AMX_INT8 = 1" in msg and "CPU:" in msg
    assert "make setup" in msg and "ALLINONE_LLAMA_CMAKE_ARGS" in msg
    assert not (tmp_path / "host-checks").exists()  # a failure is never remembered as a pass


def test_a_server_that_cannot_load_its_model_exits_non_zero_with_the_reason(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    srv = ServerProcess(str(bad))
    code = srv.proc.wait(timeout=120)
    out = srv.stop()
    assert code == 1, out
    assert "failed to load" in out and "broken.gguf" in out


def test_doctor_names_the_cpu_the_simd_paths_and_the_check(tiny_model_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "allinone",
            "doctor",
            "--check",
            "--no-cache",
            "--model",
            str(tiny_model_path),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["machine"] and "CPU" in report["system_info"]
    assert report["check"].startswith("ok")
