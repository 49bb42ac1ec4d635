"""Evaluate a classify task on a labelled file: accuracy, macro-F1, confusion, latency, speed."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from allinone.service import ClassifyResult, TaskService
from allinone.serving.errors import InputError
from allinone.tasks import TaskSpec


@dataclass
class LabelledText:
    """One row of an evaluation file, with its value mapped to a task label."""

    label: str
    text: str


def read_rows(path: Path, limit: int | None = None) -> list[tuple[str, str]]:
    """(label, text) rows of a ``label<TAB>text`` file (a ``label`` header line is skipped).
    Raises InputError for a line without a tab or a file without rows."""
    rows: list[tuple[str, str]] = []
    with Path(path).open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            value, sep, text = line.partition("\t")
            if not sep:
                raise InputError(f"{path}:{lineno}: expected label<TAB>text")
            if lineno == 1 and value == "label":
                continue
            rows.append((value.strip(), text))
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise InputError(f"{path} has no labelled rows")
    return rows


def read_labelled(path: Path, task: TaskSpec, limit: int | None = None) -> list[LabelledText]:
    """Rows of a ``label<TAB>text`` file (header optional); values map through the task's
    ``label_values`` (``1``/``0`` -> 正面/负面 for sentiment)."""
    return [LabelledText(task.label_for_value(v), t) for v, t in read_rows(path, limit)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(np.ceil(q / 100 * len(ordered))) - 1))
    return ordered[k]


@dataclass
class Scores:
    """Accuracy, macro-F1 and the confusion matrix of one set of predictions."""

    accuracy: float
    macro_f1: float
    confusion: dict[str, dict[str, int]]
    per_label_f1: dict[str, float]


def score_predictions(labels: list[str], gold: list[str], pred: list[str]) -> Scores:
    """Accuracy, macro-F1 over ``labels`` and confusion[gold][pred]."""
    confusion = {g: dict.fromkeys(labels, 0) for g in labels}
    for g, p in zip(gold, pred, strict=True):
        confusion[g][p] += 1
    f1s = {}
    for lab in labels:
        tp = confusion[lab][lab]
        fp = sum(confusion[g][lab] for g in labels if g != lab)
        fn = sum(confusion[lab][p] for p in labels if p != lab)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1s[lab] = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    correct = sum(g == p for g, p in zip(gold, pred, strict=True))
    return Scores(correct / len(gold), statistics.mean(f1s.values()), confusion, f1s)


@dataclass
class EvalReport:
    """Everything `allinone eval` prints."""

    task: str
    model: str
    file: str
    n: int
    labels: list[str]
    raw: Scores
    calibrated: Scores | None
    latency_ms: dict[str, float]
    texts_per_s: float
    batch: int
    repeat: int
    consistent: bool | None
    inconsistent_texts: int = 0
    ece: float = 0.0  # top-label, 10 bins, uncalibrated (decision_eval.expected_calibration_error)
    label_mass: float = 0.0  # mean share of the probability the labels took
    logprobs: list[list[float]] = field(default_factory=list, repr=False)
    gold: list[str] = field(default_factory=list, repr=False)

    def headline(self) -> Scores:
        """Calibrated scores when a calibration was applied, raw otherwise."""
        return self.calibrated or self.raw

    def to_dict(self) -> dict:
        """The JSON shape of ``allinone eval --json``."""
        head = self.headline()
        out = {
            "task": self.task,
            "model": self.model,
            "file": self.file,
            "n": self.n,
            "labels": self.labels,
            "accuracy": round(head.accuracy, 4),
            "macro_f1": round(head.macro_f1, 4),
            "ece": round(self.ece, 4),
            "label_mass": round(self.label_mass, 4),
            "confusion": head.confusion,
            "calibrated": self.calibrated is not None,
            "uncalibrated": {
                "accuracy": round(self.raw.accuracy, 4),
                "macro_f1": round(self.raw.macro_f1, 4),
                "confusion": self.raw.confusion,
            },
            "latency_ms": {k: round(v, 2) for k, v in self.latency_ms.items()},
            "texts_per_s": round(self.texts_per_s, 2),
            "batch": self.batch,
            "repeat": self.repeat,
        }
        if self.repeat > 1:
            out["consistent"] = self.consistent
            out["inconsistent_texts"] = self.inconsistent_texts
        return out


def _waves(items: list, size: int) -> Iterable[list]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def evaluate(
    service: TaskService,
    task_name: str,
    rows: list[LabelledText],
    batch: int = 8,
    repeat: int = 1,
    progress: bool = True,
    file: str = "",
) -> EvalReport:
    """Classify every row (``batch`` texts in flight at once so the engine batches them),
    ``repeat`` times; score raw and calibrated predictions from the same pass."""
    task = service.classify_task(task_name)
    texts = [r.text for r in rows]
    first: list[ClassifyResult] = []
    latencies: list[float] = []
    labels_seen: list[list[str]] = [[] for _ in rows]
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(rows) * repeat, unit="text", desc=f"eval {task_name}")
    t0 = time.perf_counter()
    for rep in range(repeat):
        done = 0
        for wave in _waves(texts, batch):
            jobs = service.submit_many(task_name, wave)
            for j in jobs:
                fin = j.handle.result()
                res = service.classify_result(j, fin, calibrated=False)
                latencies.append(res.latency_ms)
                labels_seen[done].append(res.label)
                if rep == 0:
                    first.append(res)
                done += 1
            if bar is not None:
                bar.update(len(wave))
    elapsed = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    gold = [r.label for r in rows]
    raw_pred = [r.label for r in first]
    raw = score_predictions(task.labels, gold, raw_pred)
    calibrated = None
    cal = service.calibrations.get(task_name)
    if cal is not None:
        pred = []
        for r in first:
            biased = cal.apply(task.labels, r.logprobs)
            pred.append(task.labels[int(np.argmax(biased))])
        calibrated = score_predictions(task.labels, gold, pred)
    inconsistent = sum(len(set(seen)) > 1 for seen in labels_seen)
    from allinone.decision_eval import expected_calibration_error

    ece = expected_calibration_error(
        [max(r.scores.values()) for r in first],
        [r.label == g for r, g in zip(first, gold, strict=True)],
    )
    mass = statistics.mean(min(1.0, sum(math.exp(x) for x in r.logprobs)) for r in first)
    return EvalReport(
        task=task_name,
        model=service.backend.model_id,
        file=file,
        n=len(rows),
        labels=task.labels,
        raw=raw,
        calibrated=calibrated,
        latency_ms={
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "p99": percentile(latencies, 99),
            "mean": statistics.mean(latencies),
        },
        texts_per_s=len(rows) * repeat / elapsed,
        batch=batch,
        repeat=repeat,
        consistent=(inconsistent == 0) if repeat > 1 else None,
        inconsistent_texts=inconsistent,
        ece=ece,
        label_mass=mass,
        logprobs=[r.logprobs for r in first],
        gold=gold,
    )


def format_report(report: EvalReport) -> str:
    """A human-readable report."""
    lines = [f"task {report.task} on {report.model}: {report.n} texts from {report.file}"]

    def block(name: str, s: Scores) -> None:
        lines.append(f"{name:<12} accuracy {s.accuracy:.4f}   macro-F1 {s.macro_f1:.4f}")

    block("uncalibrated", report.raw)
    lines.append(
        f"{'':<12} ECE {report.ece:.4f}   label mass {report.label_mass:.3f} (uncalibrated)"
    )
    if report.calibrated:
        block("calibrated", report.calibrated)
    head = report.headline()
    width = max(6, *(len(x) for x in report.labels)) + 2
    lines.append(
        "confusion (rows: gold, columns: predicted)"
        + (" - calibrated" if report.calibrated else "")
    )
    lines.append(" " * width + "".join(f"{lab:>{width}}" for lab in report.labels))
    for g in report.labels:
        lines.append(
            f"{g:<{width}}" + "".join(f"{head.confusion[g][p]:>{width}}" for p in report.labels)
        )
    lat = report.latency_ms
    lines.append(
        f"latency ms   p50 {lat['p50']:.1f}   p95 {lat['p95']:.1f}   p99 {lat['p99']:.1f}"
        f"   ({report.batch} texts in flight)"
    )
    lines.append(f"throughput   {report.texts_per_s:.2f} texts/s")
    if report.repeat > 1:
        verdict = (
            "every text got the same label"
            if report.consistent
            else (f"{report.inconsistent_texts} texts changed label")
        )
        lines.append(f"repeat x{report.repeat}   {verdict}")
    return "\n".join(lines)
