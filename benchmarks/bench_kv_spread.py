"""What cells outside a sequence cost its decode steps, in llama.cpp's unified KV cache.

llama.cpp's attention runs over every cell up to the highest one in use and checks each against
the mask (per query row and head) even where the mask hides it. With one KV buffer for every
sequence (ours: task prefixes and forks share cells by ``seq_cp``) a sequence's step therefore
pays for the other sequences' cells; llama-server gives each slot a buffer of its own
(``kv_unified = false``). Four contexts of the same model, decoding in turn (the machine's
drift over seconds hits all of them alike), one decode step at a time:

- ``split``: per-sequence buffers, as llama-server's slots;
- ``unified``: one buffer holding only the decoding sequences' cells (what the engine keeps
  since finished chats go to host memory: ``SequencePools.park``);
- ``unified + idle``: one buffer where the sequences that do not decode still hold their
  ``--prompt`` cells (idle chats, as finished chats were left before);
- ``unified + idle + far``: the same plus 64 cells of one more sequence ``--far`` cells up in
  the buffer (cells of a chat that happened to be placed late).

8 sequences decode first (each holding ``--prompt`` cells in every context), then one (the
other 7 leave ``split`` and ``unified``, stay in the ``idle`` ones).
Prints ms per step (median) for 1 and 8 decoding sequences and each layout's median step-by-step
ratio to ``split``.
Usage: .venv/bin/python benchmarks/bench_kv_spread.py [--prompt 200] [--far 7000] [--steps 60]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.backends.llama_cpp.runtime import ContextShape, LlamaRuntime
from allinone.models import ensure_model
from common import machine, write_result

N_SEQ = 8


def fill(rt: LlamaRuntime, seq: int, n: int) -> None:
    for c0 in range(0, n, rt.shape.n_batch):
        rt.batch_clear()
        for i in range(c0, min(n, c0 + rt.shape.n_batch)):
            rt.batch_add((1000 + 7 * i + 13 * seq) % 150000, i, seq, False)
        if rt.decode() != 0:
            raise RuntimeError("fill failed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompt", type=int, default=200, help="cells each sequence holds")
    ap.add_argument("--far", type=int, default=7000, help="where the idle far cells sit")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    model = ensure_model(args.model)
    shape = ContextShape(
        n_ctx=1024 * (N_SEQ + 1), n_seq_max=N_SEQ + 1, n_batch=512, threads=args.threads
    )
    rts = {
        "split": LlamaRuntime(model, dataclasses.replace(shape, kv_unified=False)),
        "unified": LlamaRuntime(model, shape),
        "unified + idle": LlamaRuntime(model, shape),
        "unified + idle + far": LlamaRuntime(model, shape),
    }
    for rt in rts.values():
        for s in range(N_SEQ):
            fill(rt, s, args.prompt)
    far = rts["unified + idle + far"]
    fill(far, N_SEQ, args.far)
    far.lib.llama_memory_seq_rm(far.mem, N_SEQ, 0, args.far - 64)
    result: dict = {"machine": machine(), "model": model.name, "args": vars(args)}
    for n_active in (N_SEQ, 1):
        active = list(range(n_active))
        for name in ("split", "unified"):  # only the decoding sequences hold cells
            for s in range(n_active, N_SEQ):
                rts[name].seq_rm(s)
        times: dict[str, list[float]] = {name: [] for name in rts}
        for k in range(args.steps):
            order = list(rts.items())
            for name, rt in order if k % 2 else reversed(order):
                rt.batch_clear()
                for s in active:
                    rt.batch_add(500 + k, args.prompt + k, s, True)
                t0 = time.perf_counter()
                if rt.decode() != 0:
                    raise RuntimeError("decode failed")
                times[name].append(time.perf_counter() - t0)
        for rt in rts.values():
            for s in active:
                rt.seq_truncate(s, args.prompt)
        warm = slice(5, None)
        row = {}
        for name in rts:
            ratio = statistics.median(
                a / b for a, b in zip(times[name][warm], times["split"][warm], strict=True)
            )
            row[name] = {
                "ms_per_step": round(1000 * statistics.median(times[name][warm]), 2),
                "ratio_to_split": round(ratio, 3),
            }
        result[f"{n_active} decoding"] = row
        print(n_active, "decoding:", json.dumps(row), flush=True)
    for rt in rts.values():
        rt.close()
    print(f"saved {write_result('kv-spread', result)}")


if __name__ == "__main__":
    main()
