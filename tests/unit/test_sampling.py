"""Sampling and log-softmax: numerically safe for every value a request may carry."""

from __future__ import annotations

import numpy as np
import pytest

from allinone.backends.base import GenerationParams
from allinone.backends.llama_cpp.sampling import log_softmax, sample_token


def _logits(n: int = 5000, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, n).astype(np.float32)


def test_greedy_at_temperature_zero():
    x = _logits()
    assert sample_token(x, GenerationParams(temperature=0.0), np.random.default_rng(0)) == int(
        np.argmax(x)
    )


@pytest.mark.parametrize("t", [5e-324, 1e-320, 1e-308, 1e-300, 1e-30, 1e-6])
def test_a_temperature_too_small_to_divide_by_is_greedy_not_nan(t):
    x = _logits()
    tok = sample_token(x, GenerationParams(temperature=t), np.random.default_rng(0))
    assert tok == int(np.argmax(x))


def test_high_temperature_and_top_p_sample_valid_tokens():
    x = _logits()
    rng = np.random.default_rng(0)
    toks = {sample_token(x, GenerationParams(temperature=2.0, top_p=0.9), rng) for _ in range(50)}
    assert len(toks) > 1 and all(0 <= t < len(x) for t in toks)


def test_top_p_smallest_keeps_only_the_best_token():
    x = _logits()
    rng = np.random.default_rng(0)
    p = GenerationParams(temperature=1.0, top_p=1e-9)
    assert {sample_token(x, p, rng) for _ in range(20)} == {int(np.argmax(x))}


def test_nan_logits_are_never_sampled_and_a_positive_infinity_wins():
    x = _logits()
    x[7] = np.nan
    rng = np.random.default_rng(0)
    for t in (0.0, 0.7, 2.0):
        assert 7 not in {sample_token(x, GenerationParams(temperature=t), rng) for _ in range(30)}
    x[9] = np.inf
    assert sample_token(x, GenerationParams(temperature=0.7), rng) == 9


def test_log_softmax_is_stable_and_normalised():
    x = np.array([1000.0, 999.0, -1000.0], dtype=np.float32)
    lp = log_softmax(x)
    assert np.all(np.isfinite(lp[:2])) and lp[0] > lp[1]
    assert np.isclose(np.exp(lp).sum(), 1.0)


def test_terminal_request_states_carry_the_finish_reason():
    from allinone.backends.llama_cpp.request import RequestState

    assert RequestState.finished("stop") is RequestState.FINISHED_STOPPED
    assert RequestState.finished("length") is RequestState.FINISHED_LENGTH
    assert RequestState.finished("cancelled") is RequestState.FINISHED_CANCELLED
    live = [s for s in RequestState if not s.is_finished]
    assert live == [
        RequestState.WAITING,
        RequestState.PREFILL,
        RequestState.DECODE,
        RequestState.SCORE_BRANCHES,
    ]
