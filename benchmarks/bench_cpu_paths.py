"""Prompt processing and decode of llama.cpp builds side by side, each with and without its extra
buffer types (AMX and repacked weights): the figures of #32 (docs/amx-sigill.md).

Each wheel is unpacked with ``pip install --no-deps --target DIR`` and named on the command line;
no ``--wheel``: the venv's own. Every (wheel, setting) runs in its own child process (a decode
that traps is reported by the child's signal), in interleaved rounds so that the machine's drift
falls on all alike; a cell is the median over rounds of each round's median of 3 decodes. Prints
the library's SIMD paths, prompt tokens/s for 33, 80 and 400 tokens, decode tokens/s (32 single
tokens after a 33-token prompt) and the greedy next token per prompt (the same tokens across
wheels and settings say the paths agree).

    .venv/bin/python benchmarks/bench_cpu_paths.py MODEL.gguf [--wheel LABEL=DIR ...] \
        [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
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
cp = L.llama_context_default_params()
cp.n_ctx, cp.n_batch, cp.n_ubatch = 1024, 512, 512
cp.n_threads = cp.n_threads_batch = threads
ctx = L.llama_init_from_model(model, cp)
batch = L.llama_batch_init(512, 0, 1)
n, tok = 33, 100
batch.n_tokens = n
for i in range(n):
    batch.token[i] = (i * 37) % 1000 + 100
    batch.pos[i], batch.n_seq_id[i], batch.seq_id[i][0] = i, 1, 0
    batch.logits[i] = i == n - 1
assert L.llama_decode(ctx, batch) == 0
t0 = time.perf_counter()
for k in range(32):
    logits = L.llama_get_logits_ith(ctx, batch.n_tokens - 1)
    tok = max(range(n_vocab), key=lambda i: logits[i])
    batch.n_tokens = 1
    batch.token[0], batch.pos[0], batch.n_seq_id[0], batch.seq_id[0][0] = tok, n + k, 1, 0
    batch.logits[0] = True
    assert L.llama_decode(ctx, batch) == 0
out["decode"] = 32 / (time.perf_counter() - t0)
print(json.dumps(out))
"""


def _child(model: str, extra: bool, threads: int, site: str | None) -> dict | str:
    env = dict(os.environ)
    if site:
        env["PYTHONPATH"] = site + os.pathsep + env.get("PYTHONPATH", "")
    ran = subprocess.run(
        [sys.executable, "-c", _CHILD, model, "1" if extra else "0", str(threads)],
        capture_output=True,
        text=True,
        env=env,
    )
    if ran.returncode != 0:
        return f"child died with code {ran.returncode} (negative: signal)"
    return json.loads(ran.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--wheel", action="append", default=[], metavar="LABEL=DIR")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    wheels = [tuple(w.split("=", 1)) for w in args.wheel] or [("installed", "")]
    cells = [(label, site, extra) for label, site in wheels for extra in (True, False)]
    results: dict[tuple, list] = {(c[0], c[2]): [] for c in cells}
    for _ in range(args.rounds):
        for label, site, extra in cells:
            results[(label, extra)].append(_child(args.model, extra, args.threads, site or None))
    print(f"threads {args.threads}, {args.rounds} interleaved rounds; cells: tokens/s (median)\n")
    print("| wheel | extra buffer types | 33-token prompt | 80 | 400 | decode | next tokens |")
    print("|---|---|---|---|---|---|---|")
    infos = {}
    for (label, extra), docs in results.items():
        ok = [d for d in docs if isinstance(d, dict)]
        if not ok:
            print(f"| {label} | {'on' if extra else 'off'} | {docs[0]} | | | | |")
            continue
        infos[label] = ok[0]["system_info"].strip()
        rate = {
            n: statistics.median(statistics.median(d["runs"][n]["rates"]) for d in ok)
            for n in ("33", "80", "400")
        }
        dec = statistics.median(d["decode"] for d in ok)
        nxt = ",".join(str(ok[0]["runs"][n]["next_token"]) for n in ("33", "80", "400"))
        print(
            f"| {label} | {'on' if extra else 'off'} | {rate['33']:.1f} | {rate['80']:.1f} | "
            f"{rate['400']:.1f} | {dec:.1f} | {nxt} |"
        )
    for label, info in infos.items():
        print(f"\n{label}: {info}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
