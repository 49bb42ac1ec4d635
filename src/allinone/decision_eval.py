"""Evaluate one decision question on a labelled file (``allinone eval --predicate/--choice/
--score``, or a decide task's question): accuracy, macro-F1, AUC, calibration error, label mass
and the flip rates a user cannot see.

Metrics (every figure over the file's rows, in file order):
- accuracy and macro-F1 of the top option against the gold label (``evaluation.score_predictions``);
- AUC (predicates): the probability that a true row gets a higher P(true) than a false row,
  ties counting half (Mann-Whitney);
- ECE: top-label expected calibration error, 10 equal-width confidence bins (Guo et al. 2017):
  ``sum_b |B_b|/n * |accuracy(B_b) - mean confidence(B_b)|``;
- label mass: mean share of the probability that went to the question's labels;
- flip rate: predicates, the share of rows where the question and its negation get the same
  yes/no (one of them must be wrong); choices and scores, the share of rows whose top option
  changes when the options are listed in reverse order.

Rows are sent ``batch`` at a time, in file order, so a ``+prior`` strategy learns its running
prior from the file's own earlier rows exactly as a server would from its traffic.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from allinone.decisions import Answer, DecisionService, Option, Question, Strategy, predicate
from allinone.evaluation import percentile, score_predictions
from allinone.serving.errors import InputError


def parse_options(spec: str) -> tuple[list[str], list[str]]:
    """``"anger,joy=happy"`` -> (gold labels, option texts): each comma-separated item is a
    gold label, shown to the model as itself or as the text after ``=``."""
    labels, texts = [], []
    for item in spec.split(","):
        label, _, text = item.partition("=")
        if not label.strip():
            raise InputError(f"empty option in {spec!r}")
        labels.append(label.strip())
        texts.append((text or label).strip())
    return labels, texts


def negation_of(q: Question) -> Question:
    """The predicate's negation, by template: a statement ``S`` becomes ``It is not true that:
    S``; a question ``Q`` becomes ``Is the answer to this question no? Q``."""
    if q.statement:
        return predicate(f"It is not true that: {q.instructions}")
    return predicate(f"Is the answer to this question no? {q.instructions}")


def reversed_options(q: Question) -> Question:
    """A choice or score with its options listed in reverse order."""
    return Question(q.kind, q.instructions, q.options[::-1], statement=q.statement)


def auc(scores: list[float], gold: list[bool]) -> float | None:
    """Mann-Whitney AUC of ``scores`` for the rows where ``gold`` is true; None when one side
    is empty."""
    pos = [s for s, g in zip(scores, gold, strict=True) if g]
    neg = [s for s, g in zip(scores, gold, strict=True) if not g]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def expected_calibration_error(
    confidence: list[float], correct: list[bool], bins: int = 10
) -> float:
    """Top-label ECE over ``bins`` equal-width bins (the last one includes 1.0)."""
    n = len(confidence)
    total = 0.0
    for b in range(bins):
        lo, hi = b / bins, (b + 1) / bins
        idx = [i for i, c in enumerate(confidence) if lo <= c < hi or (b == bins - 1 and c == 1.0)]
        if idx:
            acc = sum(correct[i] for i in idx) / len(idx)
            conf = sum(confidence[i] for i in idx) / len(idx)
            total += len(idx) / n * abs(acc - conf)
    return total


@dataclass
class DecisionEvalReport:
    """Everything ``allinone eval`` prints for a decision question."""

    kind: str
    question: str
    strategy: str
    model: str
    file: str
    n: int
    labels: list[str]
    accuracy: float
    macro_f1: float
    auc: float | None
    ece: float
    label_mass: float
    flip_rate: float | None
    mean_p_true: float | None
    branches: int
    latency_ms: dict[str, float]
    texts_per_s: float
    batch: int
    confusion: dict[str, dict[str, int]] = field(default_factory=dict)
    # per row: its gold label, the predicted label and the probabilities (label order)
    predictions: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The JSON shape of ``allinone eval --json`` for a decision (without ``predictions``,
        which ``--rows FILE`` writes)."""
        out = {
            k: (round(v, 4) if isinstance(v, float) else v)
            for k, v in self.__dict__.items()
            if k not in ("latency_ms", "predictions")
        }
        out["latency_ms"] = {k: round(v, 2) for k, v in self.latency_ms.items()}
        return out


def _run(
    service: DecisionService,
    q: Question,
    texts: list[str],
    batch: int,
    bar,
) -> tuple[list[Answer], list[float], float]:
    answers, latencies = [], []
    service.prepare([q])  # +contrast: the opposite question, written once
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        jobs = [service.submit(t, [q]) for t in texts[i : i + batch]]
        for job in jobs:
            res = service.result(job, job.handle.result())
            answers.append(res.answers[0])
            latencies.append(res.latency_ms)
        if bar is not None:
            bar.update(len(jobs))
    return answers, latencies, time.perf_counter() - t0


def evaluate_decision(
    tasks_service,
    q: Question,
    gold_labels: list[str],
    rows: list[tuple[str, str]],
    strategy: Strategy | None,
    batch: int = 8,
    flips: bool = True,
    progress: bool = True,
    file: str = "",
) -> DecisionEvalReport:
    """Ask ``q`` about every row's text and score the answers against its label.

    ``gold_labels``: a predicate's true labels (any other label is false), or per option the
    label that means it (choice, score). Raises InputError for a row whose label is unknown."""
    service = DecisionService(tasks_service, strategy)
    texts = [t for _, t in rows]
    if q.kind == "predicate":
        names = ["true", "false"]
        gold = [0 if lab in gold_labels else 1 for lab, _ in rows]
    else:
        names = list(gold_labels)
        unknown = sorted({lab for lab, _ in rows} - set(gold_labels))
        if unknown:
            raise InputError(f"labels {unknown} in {file} are not options ({gold_labels})")
        gold = [gold_labels.index(lab) for lab, _ in rows]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows) * (2 if flips else 1), unit="text", desc=f"eval {q.kind}")
    answers, latencies, elapsed = _run(service, q, texts, batch, bar)
    flip_rate = None
    if flips:
        if q.kind == "predicate":
            other, _, _ = _run(service, negation_of(q), texts, batch, bar)
            same = [
                (a.probability_true > 0.5) == (b.probability_true > 0.5)
                for a, b in zip(answers, other, strict=True)
            ]
        else:
            other, _, _ = _run(service, reversed_options(q), texts, batch, bar)
            n = len(q.options)
            same = [a.top != n - 1 - b.top for a, b in zip(answers, other, strict=True)]
        flip_rate = sum(same) / len(same)
    if bar is not None:
        bar.close()
    pred = [a.top for a in answers]
    scores = score_predictions(names, [names[g] for g in gold], [names[p] for p in pred])
    confidence = [max(a.probabilities) for a in answers]
    correct = [p == g for p, g in zip(pred, gold, strict=True)]
    p_true = [a.probability_true for a in answers] if q.kind == "predicate" else None
    return DecisionEvalReport(
        kind=q.kind,
        question=q.instructions,
        strategy=service.strategy_for(q).name,
        model=tasks_service.backend.model_id,
        file=file,
        n=len(rows),
        labels=names,
        accuracy=scores.accuracy,
        macro_f1=scores.macro_f1,
        auc=auc(p_true, [g == 0 for g in gold]) if p_true is not None else None,
        ece=expected_calibration_error(confidence, correct),
        label_mass=statistics.mean(a.label_mass for a in answers),
        flip_rate=flip_rate,
        mean_p_true=statistics.mean(p_true) if p_true is not None else None,
        branches=len(service.plan([q])[0]),
        latency_ms={
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "mean": statistics.mean(latencies),
        },
        texts_per_s=len(rows) / elapsed,
        batch=batch,
        confusion=scores.confusion,
        predictions=[
            {
                "label": lab,
                "predicted": names[p],
                "probabilities": [round(x, 6) for x in a.probabilities],
                "text": text,
            }
            for (lab, text), p, a in zip(rows, pred, answers, strict=True)
        ],
    )


def format_decision_report(r: DecisionEvalReport) -> str:
    """A human-readable report."""
    lines = [
        f"{r.kind} {r.question!r} on {r.model}, strategy {r.strategy}: {r.n} texts from {r.file}",
        f"accuracy {r.accuracy:.4f}   macro-F1 {r.macro_f1:.4f}"
        + (f"   AUC {r.auc:.4f}" if r.auc is not None else "")
        + f"   ECE {r.ece:.4f}   label mass {r.label_mass:.3f}",
    ]
    if r.mean_p_true is not None:
        lines.append(f"mean P(true) {r.mean_p_true:.3f}")
    if r.flip_rate is not None:
        what = "negation" if r.kind == "predicate" else "option reversal"
        lines.append(f"flip rate under {what} {r.flip_rate:.3f}")
    width = max(6, *(len(x) for x in r.labels)) + 2
    lines.append("confusion (rows: gold, columns: predicted)")
    lines.append(" " * width + "".join(f"{lab:>{width}}" for lab in r.labels))
    for g in r.labels:
        lines.append(f"{g:<{width}}" + "".join(f"{r.confusion[g][p]:>{width}}" for p in r.labels))
    lat = r.latency_ms
    lines.append(
        f"latency ms   p50 {lat['p50']:.1f}   p95 {lat['p95']:.1f}   ({r.batch} in flight, "
        f"{r.branches} branches a question)   {r.texts_per_s:.2f} texts/s"
    )
    return "\n".join(lines)


def ad_hoc_question(kind: str, instructions: str, options: list[str]) -> Question:
    """A question from the command line (predicate: no options)."""
    if kind == "predicate":
        return predicate(instructions)
    return Question(kind, instructions, tuple(Option(t) for t in options))  # type: ignore[arg-type]
