"""Build llama-cpp-python for this host and prove that the result runs here.

``-march=native`` compiles in every instruction-set extension the CPU *reports*, but a reported
extension is not proof that it runs: on Sapphire Rapids guests the hypervisor lists AMX and the
kernel grants the tile state, yet ``tileloadd`` traps (SIGILL) at the first batched decode. So the
build goes in three steps, each in a child process so that a trap is observed, never suffered:

1. **Probe.** For each extension in :data:`PROBES` that ``cc -march=native`` would enable, compile
   a tiny program that executes one of its instructions and run it. A probe that dies with SIGILL
   marks the extension unsafe and its ``-mno-...`` flags go into CFLAGS/CXXFLAGS (GCC lets an
   explicit ``-mno-X`` win over what ``-march=native`` implies).
2. **Build** ``llama-cpp-python==VERSION`` with ``pip wheel --no-cache-dir`` (pip's wheel cache
   would hand back a wheel built with other flags).
3. **Smoke test.** Install the wheel into a scratch folder, load a small GGUF and decode a prompt
   of at least 64 tokens in one batch (large batches take other kernels than one token), then a
   few single tokens; also check that ``llama_print_system_info()`` reports none of the
   extensions a probe found unsafe. If the native build fails this, the build is redone with a
   conservative flag set (no AVX-512, no AMX); if that fails too, the build stops with a message
   naming the CPU, the flags and what to do.

The wheelhouse folder is keyed by the llama-cpp-python version, the CPU model and flags, the
compiler and the exact CMake arguments and C flags used, so a wheel built for another CPU or with
other flags is never reused. ``build.json`` beside the wheel records all of it and the smoke
test's output.

Overrides for unusual hosts (both replace what the probes chose; the smoke test still runs):
``ALLINONE_LLAMA_CMAKE_ARGS`` (e.g. ``-DGGML_NATIVE=OFF -DGGML_AVX2=ON``) and
``ALLINONE_LLAMA_CFLAGS`` (e.g. ``-mno-amx-tile -mno-amx-int8 -mno-amx-bf16``).

This module uses the standard library only: the Makefile runs it before llama-cpp-python exists.
Usage: ``python -m allinone.llama_build --python PY --wheelhouse DIR --version V --model GGUF``
(prints the wheel's folder on stdout; progress goes to stderr).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

# ggml's CMake options for a build without -march=native that any x86-64-v3 CPU runs (Haswell,
# Zen 1 and later): the fallback when the native build does not pass its smoke test.
CONSERVATIVE_X86 = (
    "-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON "
    "-DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF "
    "-DGGML_AMX_BF16=OFF"
)
CONSERVATIVE_OTHER = "-DGGML_NATIVE=OFF"
# GCC 12 drops the stores that fill ggml's AMX tile configuration (dead-store elimination past
# ``_tile_loadconfig``'s 8-byte asm operand), so its AMX matrix multiply loads unconfigured
# tiles and dies; keeping the stores makes it run (docs/amx-sigill.md).
DSE_FIX = ("-fno-tree-dse", "-fno-dse")
_AVX512_OFF = ("-mno-avx512f",)  # GCC drops every AVX-512 subset with it
# The rungs tried in order until one passes the smoke test: the CPU's full native set, then
# without the extension most often at fault (AMX: the known trap on virtualised hosts), then
# without AVX-512, then the conservative x86-64-v3 set. Before a rebuild without AMX, the native
# wheel is tried again with llama.cpp's extra buffer types off (no AMX or repacked weights).
LADDER = ("native", "native-no-amx", "native-no-avx512", "conservative")
SMOKE_PROMPT_TOKENS = 80  # >= 64: batched matrix kernels (and AMX) start at larger batches

_AMX_PRELUDE = textwrap.dedent(
    """
    #include <immintrin.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/syscall.h>
    #include <unistd.h>
    struct tile_config { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16];
                         uint8_t rows[16]; };
    static int8_t a[16 * 64], b[16 * 64];
    static int32_t c[16 * 16];
    static void setup(void) {
        /* ARCH_REQ_XCOMP_PERM (0x1023) for XFEATURE_XTILEDATA (18), as ggml asks for it */
        syscall(SYS_arch_prctl, 0x1023, 18);
        struct tile_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette = 1;
        for (int i = 0; i < 3; i++) { cfg.rows[i] = 16; cfg.colsb[i] = 64; }
        _tile_loadconfig(&cfg);
    }
    """
)


@dataclass(frozen=True)
class Probe:
    """One instruction-set extension to try before building.

    ``macro``: what ``cc -march=native -dM -E`` defines when native would enable it (None: always
    probe). ``cflags``: what the probe program needs to compile. ``disable``: the flags that keep
    the build from using it. ``system_info``: its name in ``llama_print_system_info()``, if any.
    """

    name: str
    macro: str | None
    cflags: tuple[str, ...]
    disable: tuple[str, ...]
    source: str
    system_info: str | None = None


_AMX_OFF = ("-mno-amx-tile", "-mno-amx-int8", "-mno-amx-bf16")

PROBES: tuple[Probe, ...] = (
    Probe(
        "amx_tile",
        "__AMX_TILE__",
        ("-mamx-tile",),
        _AMX_OFF,
        _AMX_PRELUDE + "int main(void){ setup(); _tile_loadd(1, a, 64); _tile_zero(0);"
        " _tile_stored(0, c, 64); _tile_release(); return c[0]; }\n",
    ),
    Probe(
        "amx_int8",
        "__AMX_INT8__",
        ("-mamx-tile", "-mamx-int8"),
        _AMX_OFF,
        _AMX_PRELUDE + "int main(void){ setup(); _tile_loadd(1, a, 64); _tile_loadd(2, b, 64);"
        " _tile_zero(0); _tile_dpbssd(0, 1, 2); _tile_stored(0, c, 64); _tile_release();"
        " return c[0]; }\n",
        "AMX_INT8",
    ),
    Probe(
        "amx_bf16",
        "__AMX_BF16__",
        ("-mamx-tile", "-mamx-bf16"),
        _AMX_OFF,
        _AMX_PRELUDE + "int main(void){ setup(); _tile_loadd(1, a, 64); _tile_loadd(2, b, 64);"
        " _tile_zero(0); _tile_dpbf16ps(0, 1, 2); _tile_stored(0, c, 64); _tile_release();"
        " return c[0]; }\n",
    ),
    Probe(
        "avx512f",
        "__AVX512F__",
        ("-mavx512f",),
        ("-mno-avx512f",),  # GCC drops every AVX-512 subset with it
        "#include <immintrin.h>\nint main(void){ volatile float x = 1.0f;"
        " __m512 v = _mm512_set1_ps(x); v = _mm512_add_ps(v, v);"
        " return (int)_mm512_reduce_add_ps(v) != 32; }\n",
        "AVX512",
    ),
    Probe(
        "avx512_vnni",
        "__AVX512VNNI__",
        ("-mavx512f", "-mavx512vnni"),
        ("-mno-avx512vnni",),
        "#include <immintrin.h>\nint main(void){ volatile int x = 1;"
        " __m512i v = _mm512_set1_epi32(x); v = _mm512_dpbusd_epi32(v, v, v);"
        " return _mm512_reduce_add_epi32(v) == 0; }\n",
        "AVX512_VNNI",
    ),
    Probe(
        "avx512_bf16",
        "__AVX512BF16__",
        ("-mavx512f", "-mavx512bf16"),
        ("-mno-avx512bf16",),
        "#include <immintrin.h>\nint main(void){ volatile float x = 1.0f;"
        " __m512 v = _mm512_set1_ps(x); __m512bh h = _mm512_cvtne2ps_pbh(v, v);"
        " v = _mm512_dpbf16_ps(v, h, h); return (int)_mm512_reduce_add_ps(v) != 48; }\n",
        "AVX512_BF16",
    ),
    Probe(
        "avx512_fp16",
        "__AVX512FP16__",
        ("-mavx512f", "-mavx512fp16"),
        ("-mno-avx512fp16",),
        "#include <immintrin.h>\nint main(void){ volatile float x = 1.0f;"
        " __m512h v = _mm512_set1_ph((_Float16)x); v = _mm512_add_ph(v, v);"
        " return (int)_mm512_reduce_add_ph(v) != 64; }\n",
    ),
    Probe(
        "avx_vnni",
        "__AVXVNNI__",
        ("-mavx2", "-mavxvnni"),
        ("-mno-avxvnni",),
        "#include <immintrin.h>\nint main(void){ volatile int x = 1;"
        " __m256i v = _mm256_set1_epi32(x); v = _mm256_dpbusd_avx_epi32(v, v, v);"
        " return _mm256_extract_epi32(v, 0) == 0; }\n",
        "AVX_VNNI",
    ),
)


@dataclass
class ProbeResult:
    """How one probe went: ``runs``, ``traps`` (SIGILL), ``skipped`` (native would not enable
    it), ``unbuildable`` (the compiler cannot emit it) or ``failed`` (another exit or signal)."""

    name: str
    status: str
    detail: str = ""


def _log(msg: str) -> None:
    print(f"[llama-build] {msg}", file=sys.stderr, flush=True)


def compiler() -> str:
    """The C compiler CMake will use: ``$CC`` or ``cc``."""
    return os.environ.get("CC") or "cc"


def native_macros(cc: str) -> set[str]:
    """Macros ``cc -march=native`` predefines (empty if the compiler rejects the flag)."""
    try:
        out = subprocess.run(
            [cc, "-march=native", "-dM", "-E", "-x", "c", "-"],
            input="",
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return set()
    return {line.split()[1] for line in out.splitlines() if line.startswith("#define ")}


def run_probe(probe: Probe, cc: str, workdir: Path, macros: set[str] | None = None) -> ProbeResult:
    """Compile ``probe`` and run it in a child process; SIGILL means the host cannot run it.

    ``macros``: the native macro set; a probe whose macro is absent is ``skipped`` (native would
    not use the extension, so nothing needs switching off).
    """
    if macros is not None and probe.macro is not None and probe.macro not in macros:
        return ProbeResult(probe.name, "skipped", f"{probe.macro} not enabled by -march=native")
    src = workdir / f"probe_{probe.name}.c"
    exe = workdir / f"probe_{probe.name}"
    src.write_text(probe.source)
    built = subprocess.run(
        [cc, "-O0", *probe.cflags, str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if built.returncode != 0:
        return ProbeResult(probe.name, "unbuildable", built.stderr.strip()[-300:])
    try:
        ran = subprocess.run([str(exe)], capture_output=True, timeout=30)
    except subprocess.TimeoutExpired:
        return ProbeResult(probe.name, "failed", "timed out")
    if ran.returncode == -signal.SIGILL:
        return ProbeResult(probe.name, "traps", "SIGILL (illegal instruction)")
    if ran.returncode < 0:
        return ProbeResult(probe.name, "failed", f"killed by signal {-ran.returncode}")
    # A wrong arithmetic result is no reason to disable anything the build would not use.
    return ProbeResult(probe.name, "runs", f"exit {ran.returncode}")


def probe_host(cc: str, probes: tuple[Probe, ...] = PROBES) -> list[ProbeResult]:
    """Run every probe (x86-64 only; elsewhere an empty list)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    macros = native_macros(cc)
    with tempfile.TemporaryDirectory(prefix="allinone-probe-") as tmp:
        return [run_probe(p, cc, Path(tmp), macros) for p in probes]


def disabled_flags(results: list[ProbeResult], probes: tuple[Probe, ...] = PROBES) -> list[str]:
    """The ``-mno-...`` flags for every probe that trapped (or died otherwise), in order, once."""
    by_name = {p.name: p for p in probes}
    out: list[str] = []
    for r in results:
        if r.status in ("traps", "failed"):
            out.extend(f for f in by_name[r.name].disable if f not in out)
    return out


def unsafe_system_info(results: list[ProbeResult], probes: tuple[Probe, ...] = PROBES) -> list[str]:
    """``llama_print_system_info()`` names of the extensions that must not show as ``= 1``."""
    by_name = {p.name: p for p in probes}
    names = [by_name[r.name].system_info for r in results if r.status in ("traps", "failed")]
    return [n for n in names if n]


def host_description() -> dict[str, str]:
    """CPU model, architecture and flags (``/proc/cpuinfo``), for the key and for messages."""
    model, flags = platform.processor() or "", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and not model:
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = value.strip()
    except OSError:
        pass
    return {"machine": platform.machine(), "cpu": model, "flags": flags}


def compiler_version(cc: str) -> str:
    """First line of ``cc --version``."""
    try:
        out = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30)
        return out.stdout.splitlines()[0] if out.stdout else ""
    except (OSError, subprocess.SubprocessError):
        return ""


@dataclass
class BuildPlan:
    """What one build uses: ``mode`` is a rung of :data:`LADDER` or ``override``."""

    version: str
    mode: str
    cmake_args: str
    cflags: str
    probes: list[ProbeResult] = field(default_factory=list)
    unsafe: list[str] = field(default_factory=list)

    def key(self, host: dict[str, str], cc_version: str) -> str:
        """Folder name in the wheelhouse: the version and a hash of everything that shapes the
        binary (CPU, compiler, CMake arguments, C flags)."""
        blob = json.dumps(
            [self.version, host, cc_version, self.mode, self.cmake_args, self.cflags],
            sort_keys=True,
        )
        return f"{self.version}-{self.mode}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"


def ladder(macros: set[str] | None) -> list[str]:
    """The rungs worth building here: a rung that would build the same as the one above it
    (native enables no AMX, no AVX-512) is left out; off x86 only native and conservative.
    ``macros``: what ``-march=native`` defines (None: unknown, every rung is kept)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ["native", "conservative"]
    out = ["native"]
    if macros is None or "__AMX_TILE__" in macros:
        out.append("native-no-amx")
    if macros is None or "__AVX512F__" in macros:
        out.append("native-no-avx512")
    return [*out, "conservative"]


def make_plan(
    version: str,
    mode: str,
    probes: list[ProbeResult],
    macros: set[str] | None = None,
    gcc: bool = True,
) -> BuildPlan:
    """The CMake arguments and C flags for ``mode`` (a rung of :data:`LADDER`); environment
    overrides win over both. ``macros``: what ``-march=native`` defines (None: unknown);
    ``gcc``: the compiler is GCC (which needs :data:`DSE_FIX` for ggml's AMX code)."""
    unsafe = unsafe_system_info(probes)
    flags = disabled_flags(probes)

    def add(*more: str) -> None:
        flags.extend(f for f in more if f not in flags)

    if mode.startswith("native"):
        cmake = "-DGGML_NATIVE=ON"
        if mode in ("native-no-amx", "native-no-avx512"):
            add(*_AMX_OFF)
            unsafe = sorted(set(unsafe) | {"AMX_INT8"})
        if mode == "native-no-avx512":
            add(*_AVX512_OFF)
            unsafe = sorted(set(unsafe) | {"AVX512"})
        amx = macros is None or "__AMX_TILE__" in macros
        if gcc and amx and "-mno-amx-tile" not in flags:
            add(*DSE_FIX)
    else:
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        cmake = CONSERVATIVE_X86 if x86 else CONSERVATIVE_OTHER
        flags = []  # nothing the conservative set enables needs switching off
        unsafe = sorted(set(unsafe) | {"AMX_INT8", "AVX512"}) if x86 else unsafe
    cflags = " ".join(flags)
    over_cmake = os.environ.get("ALLINONE_LLAMA_CMAKE_ARGS")
    over_cflags = os.environ.get("ALLINONE_LLAMA_CFLAGS")
    if over_cmake is not None or over_cflags is not None:
        mode = "override"
        cmake = over_cmake if over_cmake is not None else cmake
        cflags = over_cflags if over_cflags is not None else cflags
        unsafe = []  # the user decides; the smoke test still has to pass
    return BuildPlan(version, mode, cmake, cflags, probes, unsafe)


# -- the smoke test (runs in a child process, against the freshly built library) ---------------

_SMOKE = textwrap.dedent(
    """
    import ctypes, json, sys
    import llama_cpp as L
    path, n_prompt, extra_bufts = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    quiet = L.llama_log_callback(lambda *a: None)  # kept referenced while C may call it
    L.llama_log_set(quiet, ctypes.c_void_p(0))
    L.llama_backend_init()
    info = L.llama_print_system_info().decode()
    print(json.dumps({"system_info": info}), flush=True)
    mp = L.llama_model_default_params()
    mp.use_extra_bufts = extra_bufts  # off: no AMX or repacked weight layouts
    model = L.llama_model_load_from_file(path.encode(), mp)
    assert model, "the model did not load"
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_threads, cp.n_threads_batch = 512, 128, 128, 2, 2
    ctx = L.llama_init_from_model(model, cp)
    assert ctx, "no context"
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    batch = L.llama_batch_init(128, 0, 1)
    def decode(tokens, pos0):
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
            batch.seq_id[i][0], batch.logits[i] = 0, int(i == len(tokens) - 1)
        batch.n_tokens = len(tokens)
        rc = L.llama_decode(ctx, batch)
        assert rc == 0, f"llama_decode returned {rc}"
        row = L.llama_get_logits_ith(ctx, len(tokens) - 1)
        return max(range(n_vocab), key=lambda i: row[i])
    prompt = [(97 + 31 * i) % n_vocab for i in range(n_prompt)]
    nxt = decode(prompt, 0)
    for k in range(4):
        nxt = decode([nxt], n_prompt + k)
    print(json.dumps({"ok": True, "prompt_tokens": n_prompt, "decoded": 4}), flush=True)
    """
)


@dataclass
class SmokeResult:
    """The smoke test's outcome; ``system_info`` as ``llama_print_system_info()`` gives it.
    ``frames``: the innermost stack frames of a crash, where gdb could give them."""

    ok: bool
    returncode: int
    system_info: str
    message: str
    frames: list[str] = field(default_factory=list)


def run_smoke(
    python: str,
    model: Path,
    pythonpath: str | None = None,
    unsafe: list[str] | None = None,
    n_prompt: int = SMOKE_PROMPT_TOKENS,
    timeout: float = 300,
    extra_bufts: bool = True,
    backtrace: bool = False,
) -> SmokeResult:
    """Load ``model`` and decode ``n_prompt`` tokens in one batch plus 4 single tokens, in a
    child process of ``python`` (``pythonpath`` first on its path); SIGILL is reported, not
    suffered. ``unsafe``: system-info names that must not be enabled (``AMX_INT8`` ...).
    ``extra_bufts``: llama.cpp's extra buffer types (AMX, repacked weights) when loading.
    ``backtrace``: on a crash, run it again under gdb (if installed) for the failing frames."""
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    argv = [python, "-c", _SMOKE, str(model), str(n_prompt), "1" if extra_bufts else "0"]
    try:
        ran = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return SmokeResult(False, -1, "", f"the smoke decode did not finish in {timeout:.0f} s")
    info = ""
    ok_line = False
    for line in ran.stdout.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        info = doc.get("system_info", info)
        ok_line = ok_line or bool(doc.get("ok"))
    if ran.returncode < 0:
        frames = crash_frames(argv, env) if backtrace else []
        try:
            name = signal.Signals(-ran.returncode).name
        except ValueError:
            name = f"signal {-ran.returncode}"
        what = {"SIGILL": " (illegal instruction)", "SIGSEGV": " (segmentation fault)"}
        at = f" in {frames[0]}" if frames else ""
        return SmokeResult(
            False,
            ran.returncode,
            info,
            f"{name}{what.get(name, '')} in the smoke decode{at}",
            frames,
        )
    if ran.returncode != 0 or not ok_line:
        tail = (ran.stderr or ran.stdout).strip()[-800:]
        return SmokeResult(False, ran.returncode, info, f"exit {ran.returncode}: {tail}")
    enabled = [name for name in (unsafe or []) if f"{name} = 1" in info.replace("  ", " ")]
    if enabled:
        return SmokeResult(
            False,
            0,
            info,
            "the library was built with extensions the probes found unsafe on this host: "
            + ", ".join(enabled),
        )
    return SmokeResult(True, 0, info, f"decoded {n_prompt} prompt tokens + 4 tokens")


def crash_frames(argv: list[str], env: dict[str, str], limit: int = 6) -> list[str]:
    """The innermost ``limit`` frames (function names) of ``argv``'s crash under ``gdb -batch``;
    empty when gdb is missing or the run does not crash again."""
    gdb = shutil.which("gdb")
    if gdb is None:
        return []
    cmd = [gdb, "-batch", "-nx", "-ex", "run", "-ex", "bt", "--args", *argv]
    try:
        ran = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    except (OSError, subprocess.SubprocessError):
        return []
    return parse_backtrace(ran.stdout)[:limit]


def parse_backtrace(text: str) -> list[str]:
    """Function names of gdb's ``bt`` lines (``#0  0x... in ggml_foo (...) at ...``), in order."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not (line.startswith("#") and line[1:2].isdigit()):
            continue
        rest = line.split(None, 1)[1] if " " in line else ""
        if " in " in rest and rest.startswith("0x"):
            rest = rest.split(" in ", 1)[1]
        name = rest.split(" (", 1)[0].strip()
        if name:
            out.append(name)
    return out


# -- the build -----------------------------------------------------------------------------------


def _wheel_in(folder: Path) -> Path | None:
    found = sorted(folder.glob("llama_cpp_python-*.whl"))
    return found[0] if found else None


def build_wheel(python: str, plan: BuildPlan, out: Path) -> Path:
    """``pip wheel`` llama-cpp-python with the plan's flags into ``out``; the wheel's path."""
    env = dict(os.environ)
    env["CMAKE_ARGS"] = plan.cmake_args
    for var in ("CFLAGS", "CXXFLAGS"):
        env[var] = " ".join(x for x in (env.get(var, ""), plan.cflags) if x)
    _log(
        f"building llama-cpp-python {plan.version} ({plan.mode}: CMAKE_ARGS={plan.cmake_args!r} "
        f"CFLAGS={plan.cflags!r}); about 5-9 minutes on 2 cores"
    )
    t0 = time.monotonic()
    cmd = [python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "-q"]
    cmd += [f"llama-cpp-python=={plan.version}", "-w", str(out)]
    subprocess.run(cmd, env=env, check=True, stdout=sys.stderr)
    wheel = _wheel_in(out)
    if wheel is None:
        raise RuntimeError(f"pip wheel produced no llama_cpp_python wheel in {out}")
    _log(f"built {wheel.name} in {time.monotonic() - t0:.0f} s")
    return wheel


def smoke_wheel(
    python: str, wheel: Path, model: Path, unsafe: list[str], extra_bufts: bool = True
) -> SmokeResult:
    """Install ``wheel`` into a scratch folder (no dependencies: the caller's Python has them)
    and run the smoke test against it (a crash is run again under gdb for its frames)."""
    with tempfile.TemporaryDirectory(prefix="allinone-smoke-") as site:
        subprocess.run(
            [
                python,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-deps",
                "--no-compile",
                "--target",
                site,
                str(wheel),
            ],
            check=True,
            stdout=sys.stderr,
        )
        return run_smoke(
            python, model, pythonpath=site, unsafe=unsafe, extra_bufts=extra_bufts, backtrace=True
        )


class BuildFailed(RuntimeError):
    """No rung of the ladder gave a library that runs here; the message says what to do."""


def _try(plan: BuildPlan, smoke: SmokeResult, extra_bufts: bool = True) -> dict:
    """One try of the ladder, as ``build.json`` records it."""
    return {
        "mode": plan.mode,
        "cmake_args": plan.cmake_args,
        "cflags": plan.cflags,
        "extra_bufts": extra_bufts,
        "ok": smoke.ok,
        "returncode": smoke.returncode,
        "message": smoke.message,
        "frames": smoke.frames,
    }


def _amx_in(plan: BuildPlan, macros: set[str] | None) -> bool:
    """Whether the plan's library may have AMX kernels (x86, native, AMX not switched off,
    and ``-march=native`` enables it or is unknown): then extra buffer types are worth a try
    without them before a rebuild, and models load without them (``load_options``)."""
    return (
        platform.machine().lower() in ("x86_64", "amd64")
        and plan.mode.startswith("native")
        and "-mno-amx-tile" not in plan.cflags.split()
        and (macros is None or "__AMX_TILE__" in macros)
    )


# Why models load without extra buffer types from a library with AMX kernels, even where they
# run: its AMX/repacked matrix kernels round differently by batch shape, so a conversation
# restored from the prompt cache continues differently from the same conversation evaluated
# fresh (the engine tests' greedy replies), and the repacked copies add ~70-140 MiB that the
# memory planner does not predict; off costs <= 6 % of prompt speed here (docs/amx-sigill.md).
_AMX_LOAD_WHY = (
    "AMX kernels: answers would depend on batch shape and the repacked weights add memory; "
    "ALLINONE_LLAMA_EXTRA_BUFTS=1 turns them on"
)


def load_options(plan: BuildPlan, macros: set[str] | None, smoke_ok_with_extra: bool) -> dict:
    """How the server loads models with this build: ``use_extra_bufts`` False where the
    library has AMX kernels (``_AMX_LOAD_WHY``) or only ran with them off, with ``why``."""
    if not smoke_ok_with_extra:
        return {"use_extra_bufts": False, "why": "the smoke decode failed with them on"}
    if _amx_in(plan, macros):
        return {"use_extra_bufts": False, "why": _AMX_LOAD_WHY}
    return {"use_extra_bufts": True}


def ensure_wheel(python: str, wheelhouse: Path, version: str, model: Path) -> Path:
    """The folder holding a llama-cpp-python wheel proven to run on this host (built if needed).

    Walks :data:`LADDER` (or the override) until a rung passes the smoke test; every try, with
    how it failed (signal, exit code, gdb's frames), is recorded in the kept wheel's
    ``build.json`` (``ladder``), and ``load.use_extra_bufts`` says whether the server must load
    models with llama.cpp's extra buffer types off. Raises BuildFailed when no rung runs.
    """
    cc = compiler()
    host = host_description()
    cc_version = compiler_version(cc)
    gcc = "clang" not in cc_version.lower()
    probes = probe_host(cc)
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    macros: set[str] | None = (native_macros(cc) or None) if x86 else set()
    for r in probes:
        if r.status != "skipped":
            _log(f"probe {r.name}: {r.status} ({r.detail})")
    tries: list[dict] = []
    for mode in ladder(macros):
        plan = make_plan(version, mode, probes, macros, gcc)
        folder = wheelhouse / plan.key(host, cc_version)
        record = folder / "build.json"
        if record.exists():
            doc = json.loads(record.read_text())
            if doc.get("smoke", {}).get("ok") and _wheel_in(folder):
                # the passing try is the rung's last (older records have none: extra on)
                passed = (doc.get("tries") or [{}])[-1]
                load = load_options(plan, macros, passed.get("extra_bufts", True))
                if doc.get("load") != load:  # a record from before this rule: bring it up
                    doc["load"] = load
                    record.write_text(json.dumps(doc, indent=2) + "\n")
                return folder
            if not doc.get("smoke", {}).get("ok"):
                tries.extend(doc.get("tries") or [_try(plan, SmokeResult(**doc["smoke"]))])
                if plan.mode != "override":
                    continue  # known not to run here: go straight to the next rung
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="allinone-wheel-", dir=wheelhouse) as tmp:
            t0 = time.monotonic()
            try:
                wheel = build_wheel(python, plan, Path(tmp))
            except (subprocess.CalledProcessError, RuntimeError) as exc:
                # a rung the compiler cannot build is a failed rung, not the end of the ladder
                # (not remembered: the next run tries it again)
                _log(f"the {plan.mode} build failed: {exc}")
                tries.append(_try(plan, SmokeResult(False, -1, "", f"build failed: {exc}")))
                if plan.mode == "override":
                    break
                continue
            seconds = time.monotonic() - t0
            smoke = smoke_wheel(python, wheel, model, plan.unsafe)
            mine = [_try(plan, smoke)]
            extra_bufts = True
            if not smoke.ok:
                _log(f"smoke test FAILED for the {plan.mode} build: {smoke.message}")
            if not smoke.ok and _amx_in(plan, macros):
                # no rebuild needed: the same library without AMX and repacked weight layouts
                retry = smoke_wheel(python, wheel, model, plan.unsafe, extra_bufts=False)
                mine.append(_try(plan, retry, extra_bufts=False))
                if retry.ok:
                    smoke, extra_bufts = retry, False
                    _log("the same build passes with llama.cpp's extra buffer types off")
            tries.extend(mine)
            doc = {
                "plan": asdict(plan),
                "host": host,
                "compiler": cc_version,
                "build_seconds": round(seconds),
                "smoke": asdict(smoke),
                "load": load_options(plan, macros, extra_bufts),
                "tries": mine,
                "ladder": tries,
                "wheel": wheel.name,
            }
            if smoke.ok:
                shutil.move(str(wheel), folder / wheel.name)
            record.write_text(json.dumps(doc, indent=2) + "\n")
        if smoke.ok:
            _log(f"smoke test passed ({smoke.message}); {smoke.system_info.strip()}")
            return folder
        if plan.mode == "override":
            break
    raise BuildFailed(
        "no llama.cpp build runs on this host.\n"
        f"  CPU: {host['cpu'] or 'unknown'} ({host['machine']})\n"
        f"  flags: {host['flags']}\n"
        f"  probes: {', '.join(f'{r.name}={r.status}' for r in probes) or 'none'}\n"
        "  tried: " + "; ".join(f"{t['mode']}: {t['message']}" for t in tries) + "\n"
        "What to do: set ALLINONE_LLAMA_CMAKE_ARGS (e.g. '-DGGML_NATIVE=OFF') and/or "
        "ALLINONE_LLAMA_CFLAGS (e.g. '-mno-avx512f') to a set this CPU runs, then run make again; "
        f"the records of each try are in {wheelhouse}/*/build.json."
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default=sys.executable, help="the Python to build for")
    ap.add_argument("--wheelhouse", required=True, type=Path)
    ap.add_argument("--version", required=True, help="llama-cpp-python version")
    ap.add_argument("--model", required=True, type=Path, help="a small GGUF for the smoke test")
    ap.add_argument("--probe-only", action="store_true", help="print the probes and the plan")
    args = ap.parse_args(argv)
    if args.probe_only:
        cc = compiler()
        probes = probe_host(cc)
        x86 = platform.machine().lower() in ("x86_64", "amd64")
        macros = (native_macros(cc) or None) if x86 else set()
        gcc = "clang" not in compiler_version(cc).lower()
        plan = make_plan(args.version, "native", probes, macros, gcc)
        print(json.dumps(asdict(plan), indent=2))
        return 0
    try:
        folder = ensure_wheel(args.python, args.wheelhouse, args.version, args.model)
    except BuildFailed as exc:
        _log(str(exc))
        return 1
    except subprocess.CalledProcessError as exc:
        _log(f"the build command failed ({shlex.join(map(str, exc.cmd))}): exit {exc.returncode}")
        return 1
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
