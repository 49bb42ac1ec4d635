"""`allinone eval` and `allinone calibrate` on real files with the real default model."""

import json
import os
import subprocess
import sys
from pathlib import Path

# A sample shipped with the tests (tests/data/README.md): nothing outside the repository.
DEV = Path(__file__).resolve().parents[1] / "data" / "chnsenticorp_dev_sample.tsv"


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "allinone", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "ALLINONE_THREADS": "2", **(env or {})},
    )


def test_eval_json_has_the_promised_fields_and_repeat_is_consistent(tmp_path):
    r = run(
        "eval",
        "--task",
        "sentiment",
        str(DEV),
        "--limit",
        "16",
        "--json",
        "--repeat",
        "2",
        # One text at a time: a request alone is bit-for-bit repeatable (docs/limits.md). With
        # several in flight, batch shapes and KV-cell placement move probabilities by ~0.01, and
        # this sample holds texts at 0.503 and 0.504 that then flip.
        "--batch",
        "1",
        env={"ALLINONE_CACHE_DIR": str(tmp_path), "ALLINONE_MODEL": str(_default())},
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["n"] == 16
    assert 0.5 <= report["accuracy"] <= 1.0
    assert 0.0 <= report["macro_f1"] <= 1.0
    assert report["latency_ms"]["p50"] > 0 and report["texts_per_s"] > 0
    assert sum(sum(row.values()) for row in report["confusion"].values()) == 16
    assert report["consistent"] is True and report["calibrated"] is False


def test_calibrate_writes_a_file_that_eval_then_uses(tmp_path):
    env = {"ALLINONE_CACHE_DIR": str(tmp_path), "ALLINONE_MODEL": str(_default())}
    r = run("calibrate", "--task", "sentiment", str(DEV), "--limit", "24", env=env)
    assert r.returncode == 0, r.stderr
    files = list((tmp_path / "calibration").rglob("sentiment.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert set(saved["bias"]) == {"正面", "负面"} and saved["n"] == 24
    r = run("eval", "--task", "sentiment", str(DEV), "--limit", "24", "--json", env=env)
    report = json.loads(r.stdout)
    assert report["calibrated"] is True and "accuracy" in report["uncalibrated"]
    # classify applies the stored bias: the favoured label's probability goes up.
    favoured = max(saved["bias"], key=saved["bias"].get)
    text = "还行吧"
    with_cal = json.loads(run("classify", "--json", text, env=env).stdout)["scores"]
    without = json.loads(run("classify", "--json", "--no-calibration", text, env=env).stdout)
    assert with_cal[favoured] > without["scores"][favoured]
    r = run(
        "eval",
        "--task",
        "sentiment",
        str(DEV),
        "--limit",
        "8",
        "--json",
        "--no-calibration",
        env=env,
    )
    assert json.loads(r.stdout)["calibrated"] is False


def test_eval_of_a_missing_file_is_a_clear_error():
    r = run("eval", "--task", "sentiment", "/nonexistent.tsv")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "nonexistent" in r.stderr


def _default() -> Path:
    from allinone.models import ensure_model

    return ensure_model("default")


def test_eval_of_a_decision_question_reports_every_promised_figure(tmp_path):
    env = {"ALLINONE_CACHE_DIR": str(tmp_path), "ALLINONE_MODEL": str(_default())}
    common = ["eval", str(DEV), "--limit", "12", "--json"]
    r = run(*common, "--predicate", "这条评论是负面的吗？", "--true", "0", env=env)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["kind"] == "predicate" and rep["n"] == 12 and rep["labels"] == ["true", "false"]
    assert rep["strategy"] == "cloze+contrast+prior"  # the server's default
    for key in ("accuracy", "macro_f1", "auc", "ece", "label_mass", "flip_rate", "mean_p_true"):
        assert 0.0 <= rep[key] <= 1.0, key
    assert rep["branches"] in (1, 2)  # 2 when the model wrote an opposite question
    assert sum(sum(row.values()) for row in rep["confusion"].values()) == 12
    r = run(
        *common,
        "--choice",
        "这条评论的情感是什么？",
        "--options",
        "0=负面,1=正面",
        "--strategy",
        "codes+permuted",
        env=env,
    )
    rep = json.loads(r.stdout)
    assert rep["strategy"] == "codes+permuted" and rep["branches"] == 2 and rep["auc"] is None
    assert 0.0 <= rep["flip_rate"] <= 1.0 and rep["labels"] == ["0", "1"]
    r = run(*common, "--choice", "?", "--options", "0,1", "--strategy", "cloze+magic", env=env)
    assert r.returncode != 0 and "magic" in r.stderr and "Traceback" not in r.stderr
    r = run(*common, "--choice", "?", "--options", "0", env=env)  # a label not among options
    assert r.returncode == 2 and "not options" in r.stderr and "Traceback" not in r.stderr
