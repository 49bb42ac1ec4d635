"""A short soak in CI: the whole request mix against a real (tiny-model) server, memory sampled
from /proc; fails on clear growth. The long soak (thousands of requests) is a benchmark."""

import json

import pytest

from allinone.cli import main


@pytest.mark.slow
def test_short_soak_finds_no_growth_and_no_errors(tmp_path, tiny_model_path, capsys, monkeypatch):
    # The host-memory prompt cache is bounded but fills over time (~1.2 MB a chat for the tiny
    # model): 4 MB fills within the warm-up and then keeps evicting, which the soak exercises.
    monkeypatch.setenv("ALLINONE_PROMPT_CACHE_MB", "4")
    out = tmp_path / "soak"
    rc = main(
        [
            "soak",
            "--model",
            str(tiny_model_path),
            "--classify-task",
            "sentiment-en",
            "--requests",
            "300",
            "--concurrency",
            "4",
            "--warmup",
            "0.7",
            # memory fills for ~200 requests (see README), so the fit uses the last 90;
            # 2 MB over 90 requests (~20 KB a request) is 200 MB per 10k: a clear leak
            "--max-slope",
            "200",
            "--out",
            str(out),
        ]
    )
    report = json.loads((out / "soak.json").read_text())
    print(capsys.readouterr().out)
    assert report["errors"] == []
    assert set(report["by_status"]) == {"200"}, report["by_status"]
    assert sum(report["by_status"].values()) == 300
    assert len(report["samples"]) >= 10
    assert (out / "soak.png").stat().st_size > 10_000
    assert report["slope_mb_per_10k"] <= 200, report["slope_mb_per_10k"]
    assert report["plateau"] is True
    assert rc == 0
