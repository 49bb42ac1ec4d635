"""Prompt processing of one llama.cpp build, with and without its extra buffer types (AMX and
repacked weights), for comparing wheels built with different CPU paths side by side (#32).

Run once per wheel, each unpacked with ``pip install --no-deps --target DIR``:
``PYTHONPATH=DIR .venv/bin/python benchmarks/bench_cpu_paths.py MODEL.gguf`` (no PYTHONPATH: the
venv's own wheel). Prints the library's SIMD paths, then per setting and prompt length the median
prompt tokens/s of 3 runs and the greedy next token (the same token across wheels and settings
says the paths agree). A setting whose decode traps is reported by the child's signal; each
setting runs in its own child process for that reason.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

_CHILD = r"""
import ctypes, json, sys, time
import llama_cpp as L
path, extra, threads = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
quiet = L.llama_log_callback(lambda *a: None)
L.llama_log_set(quiet, ctypes.c_void_p(0))
L.llama_backend_init()
mp = L.llama_model_default_params()
mp.use_extra_bufts = extra
model = L.llama_model_load_from_file(path.encode(), mp)
vocab = L.llama_model_get_vocab(model)
n_vocab = L.llama_vocab_n_tokens(vocab)
out = {"system_info": L.llama_print_system_info().decode(), "runs": {}}
for n in (33, 80, 400):
    rates, best = [], None
    for _ in range(3):
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = 1024, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        ctx = L.llama_init_from_model(model, cp)
        batch = L.llama_batch_init(512, 0, 1)
        batch.n_tokens = n
        for i in range(n):
            batch.token[i] = (i * 37) % 1000 + 100
            batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = i, 1, 0
            batch.logits[i] = i == n - 1
        t0 = time.perf_counter()
        assert L.llama_decode(ctx, batch) == 0
        rates.append(n / (time.perf_counter() - t0))
        logits = L.llama_get_logits_ith(ctx, n - 1)
        best = max(range(n_vocab), key=lambda i: logits[i])
        L.llama_batch_free(batch)
        L.llama_free(ctx)
    out["runs"][n] = {"rates": rates, "next_token": best}
print(json.dumps(out))
"""


def main() -> int:
    model = sys.argv[1]
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for extra in ("1", "0"):
        ran = subprocess.run(
            [sys.executable, "-c", _CHILD, model, extra, str(threads)],
            capture_output=True,
            text=True,
        )
        label = "extra buffer types " + ("on (AMX, repack)" if extra == "1" else "off")
        if ran.returncode != 0:
            print(f"{label}: child died with code {ran.returncode} (negative: signal)")
            continue
        doc = json.loads(ran.stdout.strip().splitlines()[-1])
        print(f"{label}: {doc['system_info'].strip()}")
        for n, r in doc["runs"].items():
            rate = statistics.median(r["rates"])
            print(f"  {n:>4}-token prompt: {rate:7.1f} tokens/s  next token {r['next_token']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
