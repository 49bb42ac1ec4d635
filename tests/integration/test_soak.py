"""A short soak in CI: the whole request mix against a real (tiny-model) server, memory sampled
from /proc; fails on clear growth. The long soak (thousands of requests) is a benchmark."""

import json

import pytest

from allinone.cli import main


@pytest.mark.slow
def test_short_soak_finds_no_growth_and_no_errors(tmp_path, tiny_model_path, capsys):
    out = tmp_path / "soak"
    rc = main(
        [
            "soak",
            "--model",
            str(tiny_model_path),
            "--classify-task",
            "sentiment-en",
            "--requests",
            "150",
            "--concurrency",
            "4",
            "--warmup",
            "0.3",
            # 1 MB over ~100 requests after warm-up is 100 MB per 10k: a clear leak
            "--max-slope",
            "100",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "soak.json").read_text())
    print(capsys.readouterr().out)
    assert report["errors"] == []
    assert set(report["by_status"]) == {"200"}, report["by_status"]
    assert sum(report["by_status"].values()) == 150
    assert len(report["samples"]) >= 10
    assert (out / "soak.png").stat().st_size > 10_000
    assert report["slope_mb_per_10k"] <= 100, report["slope_mb_per_10k"]
    assert rc == 0
