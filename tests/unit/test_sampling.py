"""Sampling and log-softmax: numerically safe for every value a request may carry."""

from __future__ import annotations

import numpy as np
import pytest

from allinone.backends.base import GenerationParams
from allinone.backends.llama_cpp.sampling import (
    REPEAT_LAST_N,
    log_softmax,
    process_logits,
    sample_token,
)


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


# -- top_k, min_p, repetition_penalty (llama.cpp's samplers) ----------------------------------


def _draws(x: np.ndarray, p: GenerationParams, n: int = 300) -> set[int]:
    rng = np.random.default_rng(0)
    return {sample_token(x, p, rng) for _ in range(n)}


def test_top_k_keeps_the_k_most_likely_tokens():
    x = _logits()
    top3 = set(np.argsort(-x)[:3].tolist())
    assert _draws(x, GenerationParams(temperature=1.0, top_k=1)) == {int(np.argmax(x))}
    drawn = _draws(x, GenerationParams(temperature=5.0, top_k=3))
    assert drawn <= top3 and len(drawn) > 1
    # <= 0 is off: far more than 3 distinct tokens at a high temperature
    assert len(_draws(x, GenerationParams(temperature=5.0, top_k=0))) > 3


def test_min_p_keeps_tokens_within_its_share_of_the_best_judged_before_temperature():
    x = np.array([0.0, -0.5, -1.0, -5.0, -0.6931], dtype=np.float32)
    # p_i / p_max = exp(x_i): 1, 0.61, 0.37, 0.007, 0.50002
    assert _draws(x, GenerationParams(temperature=1.0, min_p=1.0)) == {0}
    assert _draws(x, GenerationParams(temperature=1.0, min_p=0.5)) == {0, 1, 4}
    # a high temperature flattens the distribution but does not widen min_p's set (llama.cpp
    # applies min_p before temperature)
    assert _draws(x, GenerationParams(temperature=2.0, min_p=0.5)) == {0, 1, 4}
    assert _draws(x, GenerationParams(temperature=2.0, min_p=0.0)) == {0, 1, 2, 3, 4}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_once_per_token():
    x = np.array([2.0, -2.0, 1.0, 0.0, 3.0], dtype=np.float32)
    p = GenerationParams(repetition_penalty=2.0)
    out = process_logits(x, p, {}, [0, 1, 1, 3])
    assert out.tolist() == [1.0, -4.0, 1.0, 0.0, 3.0]
    assert x.tolist() == [2.0, -2.0, 1.0, 0.0, 3.0]  # the engine's logits are not written
    # below 1 it rewards repeats instead, as llama.cpp's penalty_repeat does
    rewarded = process_logits(x, GenerationParams(repetition_penalty=0.5), {}, [0, 1])
    assert rewarded.tolist()[:2] == [4.0, -1.0]
    # 1.0 is off: the logits themselves, no copy
    assert process_logits(x, GenerationParams(), {}, [0, 1]) is x


def test_repetition_penalty_comes_after_logit_bias_and_before_openai_penalties():
    x = np.array([-2.0, 1.0, 0.0], dtype=np.float32)
    p = GenerationParams(
        repetition_penalty=2.0, logit_bias={0: 3.0}, presence_penalty=0.5, frequency_penalty=0.0
    )
    out = process_logits(x, p, {1: 1}, [0, 1])
    # token 0: (-2 + 3) / 2; token 1: 1 / 2 - 0.5
    assert out.tolist() == [0.5, 0.0, 0.0]


def test_the_repetition_window_is_the_last_64_tokens_of_the_prompt():
    from allinone.backends.base import RequestHandle
    from allinone.backends.llama_cpp.request import Request

    req = Request(
        kind="generate",
        handle=RequestHandle(),
        prefix_key=(),
        prefix_tokens=list(range(50)),
        body_tokens=list(range(50, 100)),
    )
    assert list(req.recent) == list(range(100 - REPEAT_LAST_N, 100))
    req.recent.append(7)
    assert len(req.recent) == REPEAT_LAST_N and req.recent[-1] == 7
