"""Does the installed llama.cpp answer the same with its extra buffer types (AMX, repacked weights)
as without them? Label scores of the ``sentiment`` task on the same ChnSentiCorp test texts, the
served model loaded each way in its own process (``ALLINONE_LLAMA_EXTRA_BUFTS=1`` / ``0``).

Prints the library's SIMD paths, how many labels agree, and the largest and mean absolute
difference of the top label's probability. Run:

    .venv/bin/python benchmarks/bench_amx_agreement.py [--texts 40] [--model default]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED_DATA, read_tsv


def child(model: str, texts: int) -> None:
    import llama_cpp

    from allinone.backends.llama_cpp import LlamaCppBackend
    from allinone.models import ensure_model
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    backend = LlamaCppBackend(ensure_model(model), EngineSettings(), model)
    backend.load()
    service = TaskService(backend, TaskRegistry.load())
    rows = read_tsv(SHARED_DATA / "chnsenticorp" / "test.tsv", texts)
    out = []
    for _, text in rows:
        (r,) = service.classify("sentiment", [text])
        out.append({"label": r.label, "scores": r.scores})
    backend.close()
    info = llama_cpp.llama_print_system_info().decode().strip()
    print(json.dumps({"system_info": info, "answers": out}, ensure_ascii=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--texts", type=int, default=40)
    ap.add_argument("--model", default="default")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.texts)
        return 0
    runs = {}
    for extra in ("1", "0"):
        env = {**os.environ, "ALLINONE_LLAMA_EXTRA_BUFTS": extra}
        cmd = [sys.executable, __file__, "--child", "--texts", str(args.texts)]
        done = subprocess.run(
            [*cmd, "--model", args.model], capture_output=True, text=True, env=env, check=True
        )
        runs[extra] = json.loads(done.stdout.strip().splitlines()[-1])
    on, off = runs["1"]["answers"], runs["0"]["answers"]
    same = sum(a["label"] == b["label"] for a, b in zip(on, off, strict=True))
    diffs = [
        abs(a["scores"][a["label"]] - b["scores"][a["label"]]) for a, b in zip(on, off, strict=True)
    ]
    print(f"library: {runs['1']['system_info']}")
    print(f"{args.texts} ChnSentiCorp test texts, sentiment task, extra buffer types on vs off:")
    print(f"  same label: {same}/{len(on)}")
    print(f"  |P(label) on - off|: max {max(diffs):.4f}, mean {statistics.mean(diffs):.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
