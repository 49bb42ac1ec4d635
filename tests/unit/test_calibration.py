"""Calibration arithmetic and files; evaluation scoring."""

import numpy as np
import pytest

from allinone import calibration
from allinone.evaluation import percentile, score_predictions
from allinone.tasks import TaskRegistry


def test_fit_bias_removes_a_constant_lean():
    rng = np.random.default_rng(0)
    n = 400
    gold = rng.integers(0, 2, n)
    signal = np.where(gold == 1, 1.0, -1.0) + rng.normal(0, 0.8, n)
    # label 1's log-prob is pushed down by 1.5 for every text: a lean towards label 0
    logps = np.stack([np.zeros(n), signal - 1.5], axis=1)
    before = (np.argmax(logps, 1) == gold).mean()
    bias = calibration.fit_bias(logps, gold)
    after = (np.argmax(logps + bias, 1) == gold).mean()
    assert after > before + 0.1
    assert bias[1] - bias[0] == pytest.approx(1.5, abs=0.3)
    assert bias.sum() == pytest.approx(0.0, abs=1e-9)


def test_calibration_file_round_trip_and_staleness(tmp_path):
    task = TaskRegistry.load().get("sentiment")
    cal = calibration.new_calibration(
        task,
        "m",
        np.array([0.25, -0.25]),
        fitted_on="dev.tsv",
        n=10,
        accuracy_before=0.8,
        accuracy_after=0.85,
    )
    path = calibration.save(cal, calibration.calibration_path(tmp_path, "m", "sentiment"))
    loaded = calibration.load(path, task)
    assert loaded.bias == {"正面": 0.25, "负面": -0.25}
    assert loaded.apply(task.labels, [-1.0, -1.0]) == [-0.75, -1.25]
    changed = task.model_copy(update={"system": "another prompt"})
    assert calibration.load(path, changed) is None  # the task changed: the fit no longer holds
    assert calibration.load(tmp_path / "absent.json", task) is None


def test_scores_accuracy_macro_f1_confusion():
    s = score_predictions(["a", "b"], ["a", "a", "b", "b"], ["a", "b", "b", "b"])
    assert s.accuracy == 0.75
    assert s.confusion == {"a": {"a": 1, "b": 1}, "b": {"a": 0, "b": 2}}
    assert s.per_label_f1["a"] == pytest.approx(2 / 3)
    assert s.per_label_f1["b"] == pytest.approx(0.8)
    assert s.macro_f1 == pytest.approx((2 / 3 + 0.8) / 2)


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99
    assert percentile([5.0], 95) == 5.0
