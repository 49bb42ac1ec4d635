"""Decision accuracy per strategy on the labelled dev sets, and the classify tasks on the same
texts: the table in docs/decision-accuracy.md.

Each cell is one ``allinone eval ... --json`` run (a fresh process: the running prior starts
empty and learns from the file's earlier rows, as a server would from its traffic). Sets: the
dev samples under ``../shared/data`` (sources and licences: docs/data.md).

Run: `.venv/bin/python benchmarks/bench_decision_accuracy.py --model default --limit 100
[--strategies codes,cloze+prior] [--sets emotion-en,routing] [--out DIR]`; runs whose JSON is
already in ``--out`` are not run again, and ``--table`` only prints the table from ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ROOT, SHARED_DATA, machine

DATA = SHARED_DATA.parent  # shared/data

# name -> (file under shared/data, question flags, classify task or None)
SETS: dict[str, tuple[str, list[str], str | None]] = {
    "sentiment-en (neg?)": (
        "sentiment/sst2/dev.tsv",
        ["--predicate", "Is this review negative?", "--true", "0"],
        "sentiment-en",
    ),
    "sentiment-en (pos?)": (
        "sentiment/sst2/dev.tsv",
        ["--predicate", "Is this review positive?", "--true", "1"],
        None,
    ),
    "sentiment-zh (neg?)": (
        "sentiment/chnsenticorp/dev_clean.tsv",
        ["--predicate", "这条评论是负面的吗？", "--true", "0"],
        "sentiment",
    ),
    "sentiment-en (choice)": (
        "sentiment/sst2/dev.tsv",
        ["--choice", "What is the sentiment of this review?", "--options", "0=negative,1=positive"],
        None,
    ),
    "safety-zh COLD": (
        "tasks/cold/dev.tsv",
        ["--predicate", "Is this text offensive, insulting or hateful?", "--true", "offensive"],
        "safety",
    ),
    "safety-zh COLD (choice)": (
        "tasks/cold/dev.tsv",
        [
            "--choice",
            "Is this text offensive?",
            "--options",
            "offensive=offensive,not_offensive=not offensive",
        ],
        None,
    ),
    "safety-en OLID": (
        "tasks/tweeteval-offensive/dev.tsv",
        ["--predicate", "Is this text offensive, insulting or hateful?", "--true", "offensive"],
        "safety",
    ),
    "emotion-en": (
        "tasks/tweeteval-emotion/dev.tsv",
        [
            "--choice",
            "Which emotion does the tweet express?",
            "--options",
            "anger,joy,optimism,sadness",
        ],
        "emotion",
    ),
    "emotion-zh": (
        "tasks/smp2020-ewect/dev.tsv",
        [
            "--choice",
            "这条微博表达的是哪种情绪？",
            "--options",
            "anger=愤怒,fear=恐惧,joy=高兴,neutral=中性,sadness=悲伤,surprise=惊讶",
        ],
        "emotion",
    ),
    "routing-en": (
        "tasks/banking77-dept/dev.tsv",
        [
            "--choice",
            "Which department should handle this customer message?",
            "--options",
            "account,cards,fees_exchange=fees and exchange rates,payments,security,"
            "top_up=top up,transfers",
        ],
        "routing",
    ),
}


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


def run(model: str, name: str, strategy: str, limit: int, out: Path) -> dict | None:
    """One eval run (strategy ``classify``: the set's classify task), cached in ``out``."""
    path = out / f"{model}-{slug(name)}-{slug(strategy)}.json"
    if path.exists() and path.stat().st_size:
        return json.loads(path.read_text())
    file, flags, task = SETS[name]
    cmd = [sys.executable, "-m", "allinone", "eval", str(DATA / file), "--model", model]
    cmd += ["--limit", str(limit), "--json"]
    if strategy == "classify":
        if task is None:
            return None
        cmd += ["--task", task, "--no-calibration"]
    else:
        cmd += [*flags, "--strategy", strategy, "--no-flips"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"{name} {strategy}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    path.write_text(done.stdout)
    return json.loads(done.stdout)


def cell(r: dict | None) -> str:
    if r is None:
        return ""
    head = f"{r['accuracy']:.2f} / {r['macro_f1']:.2f}"
    if r.get("auc") is not None:
        head += f" / AUC {r['auc']:.2f}"
    return head


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--model", default="default")
    ap.add_argument("--limit", type=int, default=100)
    ap.add_argument(
        "--strategies", default="codes,codes+prior,codes+contrast,codes+contrast+prior,cloze+prior"
    )
    ap.add_argument("--sets", default=",".join(SETS))
    ap.add_argument("--out", type=Path, default=ROOT / "bench-results" / "decisions")
    ap.add_argument("--table", action="store_true", help="only print the table from --out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    strategies = [*args.strategies.split(","), "classify"]
    names = args.sets.split(",")
    print(f"model {args.model}, first {args.limit} rows of each dev file; {machine()['cpu_model']}")
    print("cells: accuracy / macro-F1 (/ AUC for predicates)\n")
    print("| set | " + " | ".join(strategies) + " |")
    print("|---" * (len(strategies) + 1) + "|")
    for name in names:
        cells = []
        for st in strategies:
            path = args.out / f"{args.model}-{slug(name)}-{slug(st)}.json"
            if args.table:
                r = json.loads(path.read_text()) if path.exists() else None
            else:
                r = run(args.model, name, st, args.limit, args.out)
            cells.append(cell(r))
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
