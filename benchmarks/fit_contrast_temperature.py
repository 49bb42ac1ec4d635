"""Fit the temperature that makes contrast-read predicate probabilities mean what they say.

A predicate read with ``+contrast`` averages the question's and its opposite's log-odds, which
leaves the answer under-confident (docs/decision-accuracy.md: ECE 0.26-0.28 at accuracy 0.80).
Post-hoc temperature scaling (Guo et al. 2017, "On Calibration of Modern Neural Networks";
decision-accuracy spec 1.8) multiplies the final log-odds by one factor T fitted by negative
log-likelihood on labelled rows; it changes confidence, never which answer is on top.

Input: the rows ``allinone eval ... --predicate Q --true L --rows FILE`` wrote (JSON lines:
label, probabilities [P(true), P(false)]), read with the temperature the rows were made with.
The first half of each file fits T (pooled over files); the second half reports ECE and NLL
before and after, per file. Run:

    .venv/bin/python benchmarks/fit_contrast_temperature.py --true 0 rows-sst2.jsonl rows-chn.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from allinone.decision_eval import expected_calibration_error


def _logit(p: float) -> float:
    p = min(max(p, 1e-9), 1 - 1e-9)
    return math.log(p / (1 - p))


def _scaled(rows: list[tuple[float, bool]], t: float) -> list[float]:
    return [1 / (1 + math.exp(-t * _logit(p))) for p, _ in rows]


def nll(rows: list[tuple[float, bool]], t: float) -> float:
    """Mean negative log-likelihood of the gold answer with the log-odds times ``t``."""
    ps = _scaled(rows, t)
    return -sum(
        math.log(max(p if y else 1 - p, 1e-12)) for p, (_, y) in zip(ps, rows, strict=True)
    ) / len(rows)


def ece(rows: list[tuple[float, bool]], t: float) -> float:
    """Top-label ECE (10 bins) with the log-odds times ``t``."""
    ps = _scaled(rows, t)
    conf = [max(p, 1 - p) for p in ps]
    correct = [(p > 0.5) == y for p, (_, y) in zip(ps, rows, strict=True)]
    return expected_calibration_error(conf, correct)


def load(path: Path, true: set[str]) -> list[tuple[float, bool]]:
    """(P(true), gold is true) per row of an ``--rows`` file."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        out.append((row["probabilities"][0], row["label"] in true))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", type=Path, nargs="+", help="--rows files of predicate evals")
    ap.add_argument("--true", required=True, help="labels that mean true (comma-separated)")
    args = ap.parse_args()
    true = {v.strip() for v in args.true.split(",")}
    sets = {f.name: load(f, true) for f in args.files}
    fit = [r for rows in sets.values() for r in rows[: len(rows) // 2]]
    grid = [round(0.5 + 0.05 * i, 2) for i in range(391)]  # 0.5 .. 20.0
    best = min(grid, key=lambda t: nll(fit, t))
    print(f"fitted on {len(fit)} rows (first half of each file): T = {best}")
    print("| rows (second half) | n | ECE before | ECE after | NLL before | NLL after |")
    print("|---|---|---|---|---|---|")
    for name, rows in sets.items():
        held = rows[len(rows) // 2 :]
        print(
            f"| {name} | {len(held)} | {ece(held, 1.0):.3f} | {ece(held, best):.3f} | "
            f"{nll(held, 1.0):.3f} | {nll(held, best):.3f} |"
        )


if __name__ == "__main__":
    main()
