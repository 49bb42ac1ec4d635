"""A question's first answers: how right a ``+prior`` strategy is before its running prior exists.

A server sees each new question for the first time; until ``PRIOR_MIN_INPUTS`` inputs were read
its running prior (batch calibration) cannot apply. This compares, on the same rows of the dev
sets, three readings of the default strategy's questions:

- ``raw``: the strategy without ``+prior`` (what a first answer was before content-free priors);
- ``content-free``: only the prior read once on ``CONTENT_FREE_INPUTS`` (contextual calibration,
  Zhao et al. 2021), as every answer would be if the running prior never took over: the quality
  of a question's first answers;
- ``running``: the server's behaviour (content-free prior, then the running prior after 8).

Each row is read in file order, 8 in flight. Run:

    .venv/bin/python benchmarks/bench_cold_start.py [--model default] [--limit 100] [--sets ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decision_accuracy import DATA, SETS
from common import machine


def main() -> None:
    from allinone.backends.llama_cpp import LlamaCppBackend
    from allinone.decision_eval import ad_hoc_question, evaluate_decision, parse_options
    from allinone.decisions import DecisionService, QuestionPriors, Strategy
    from allinone.evaluation import read_rows
    from allinone.models import ensure_model, get_entry
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument("--sets", default="sentiment-en (neg?),safety-zh COLD,emotion-en,routing-en")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    entry = get_entry(args.model)
    backend = LlamaCppBackend(ensure_model(args.model), EngineSettings(), args.model)
    backend.load()
    own = dict(entry.decision_strategy) if entry else {}
    print(f"model {args.model}, first {args.limit} rows; {machine()['cpu_model']}")
    print("cells: accuracy / macro-F1 (/ AUC for predicates) / ECE\n")
    print("| set | strategy | raw (no prior) | content-free prior only | running (server) |")
    print("|---|---|---|---|---|")
    out = {}
    for name in args.sets.split(","):
        file, flags, _ = SETS[name]
        kind = flags[0].lstrip("-")
        if kind == "predicate":
            q = ad_hoc_question("predicate", flags[1], [])
            gold = flags[3].split(",")
        else:
            gold, texts = parse_options(flags[3])
            q = ad_hoc_question(kind, flags[1], texts)
        rows = read_rows(DATA / file, args.limit)
        cells = {}
        for mode in ("raw", "content-free", "running"):
            priors = QuestionPriors(min_inputs=10**9 if mode == "content-free" else 8)
            service = TaskService(backend, TaskRegistry.load(), decision_strategy=own)
            service.decision_priors = priors
            st = DecisionService(service).strategy_for(q)
            if mode == "raw":
                st = Strategy(st.reading, st.permuted, prior=False, contrast=st.contrast)
            r = evaluate_decision(service, q, gold, rows, st, flips=False, progress=False)
            cells[mode] = r.to_dict()
        out[name] = cells
        fmt = [
            f"{c['accuracy']:.2f} / {c['macro_f1']:.2f}"
            + (f" / AUC {c['auc']:.2f}" if c.get("auc") is not None else "")
            + f" / ECE {c['ece']:.2f}"
            for c in cells.values()
        ]
        print(f"| {name} | {cells['running']['strategy']} | " + " | ".join(fmt) + " |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1, ensure_ascii=False))
    backend.close()


if __name__ == "__main__":
    main()
