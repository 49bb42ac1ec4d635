"""Sampling and log-probabilities over one row of logits (pure functions, any thread)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from allinone.backends.base import GenerationParams, TokenLogprob

# Sampling with temperature looks at the most likely tokens only; the tail beyond them carries
# negligible mass and sorting all 150k logits every step would cost milliseconds.
_TOP_CANDIDATES = 1000

# Tokens the repetition penalty looks back over: llama.cpp's ``repeat_last_n`` default (its
# server also counts the prompt's tokens in this window).
REPEAT_LAST_N = 64


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable log-softmax in float64."""
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


def process_logits(
    logits: np.ndarray,
    params: GenerationParams,
    counts: dict[int, int],
    recent: Iterable[int] = (),
) -> np.ndarray:
    """The logits a token is sampled from, before any grammar (``TokenMatcher.apply``), in this
    order: ``logit_bias`` added; llama.cpp's repetition penalty (``penalty_repeat``, the CTRL
    paper's) on every distinct token of ``recent`` (the last ``REPEAT_LAST_N`` tokens of prompt
    and reply): a positive logit divided by ``repetition_penalty``, any other multiplied by it;
    then OpenAI's presence and frequency penalties subtracted (``counts``: token id -> times
    generated so far; penalty = count * frequency_penalty + presence_penalty, as in OpenAI's
    API reference). A float64 copy when any applies; ``logits`` itself otherwise."""
    penalised = bool(counts) and bool(params.presence_penalty or params.frequency_penalty)
    repeat = params.repetition_penalty != 1.0
    x = logits  # nothing to do: no copy (a plain request allocates as it always did)
    if params.logit_bias or penalised or repeat:
        x = logits.astype(np.float64)
        if params.logit_bias:
            ids = np.fromiter(params.logit_bias.keys(), dtype=np.int64)
            x[ids] += np.fromiter(params.logit_bias.values(), dtype=np.float64)
        if repeat:
            seen = np.unique(np.fromiter(recent, dtype=np.int64))
            if seen.size:
                v = x[seen]
                x[seen] = np.where(
                    v > 0, v / params.repetition_penalty, v * params.repetition_penalty
                )
        if penalised:
            ids = np.fromiter(counts.keys(), dtype=np.int64)
            n = np.fromiter(counts.values(), dtype=np.float64)
            x[ids] -= n * params.frequency_penalty + params.presence_penalty
    return x


def token_logprob(logits: np.ndarray, token: int, top: int, piece) -> TokenLogprob:
    """``token``'s log-probability under ``logits`` and the ``top`` most likely tokens
    (``piece``: token id -> bytes)."""
    lp = log_softmax(logits)
    best: tuple[tuple[bytes, float], ...] = ()
    if top > 0:
        ids = np.argpartition(lp, -top)[-top:]
        ids = ids[np.argsort(-lp[ids])]
        best = tuple((piece(int(i)), float(lp[i])) for i in ids)
    return TokenLogprob(piece(token), float(lp[token]), best)


def sample_token(logits: np.ndarray, params: GenerationParams, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise llama.cpp's truncations, then temperature + top-p
    over the top candidates.

    Truncation as llama.cpp's samplers: ``top_k`` (<= 0: off) keeps the k most likely tokens;
    ``min_p`` (0: off) keeps the tokens whose probability is at least ``min_p`` times the best
    one's, judged before temperature as llama.cpp does (a logit within ``ln(min_p)`` of the
    best). Both keep the best token, so neither changes a greedy choice. Then the temperature,
    then ``top_p`` (the smallest set of most likely tokens whose probability reaches it).

    Numerically safe for every accepted value: NaN logits are never chosen, a +inf logit is
    taken outright, and the logits are shifted by their maximum before the division, so a
    temperature too small to divide by (5e-324) gives -inf for every other token, i.e. greedy,
    never NaN probabilities.
    """
    if params.temperature <= 0.0:
        # argmax over the logits as they are, without a float64 copy and a finiteness check of
        # all of them each step; np.argmax returns a NaN's index when there is one, and then
        # the checked path below decides.
        best = int(np.argmax(logits))
        if not np.isnan(logits[best]):
            return best
    x = logits.astype(np.float64)
    if not np.isfinite(x).all():
        x = np.nan_to_num(x, nan=-np.inf, neginf=-np.inf, posinf=np.inf)
        if np.isposinf(x).any():
            return int(np.argmax(x))
    if params.temperature <= 0.0:
        return int(np.argmax(x))
    k = min(_TOP_CANDIDATES, x.shape[0])
    if params.top_k > 0:
        k = min(k, params.top_k)
    top = np.argpartition(x, -k)[-k:]
    vals = x[top]
    order = np.argsort(-vals)
    top, vals = top[order], vals[order]
    if params.min_p > 0.0:
        # p_i >= min_p * p_max  <=>  logit_i >= logit_max + ln(min_p) (same normaliser)
        keep = int(np.count_nonzero(vals >= vals[0] + np.log(params.min_p)))
        top, vals = top[: max(keep, 1)], vals[: max(keep, 1)]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = (vals - vals[0]) / params.temperature
        probs = np.exp(scaled)
    probs[~np.isfinite(probs)] = 0.0
    probs[0] = 1.0  # the best token: exp(0), also when the division over- or underflowed
    probs /= probs.sum()
    if params.top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p) + 1)
        top, probs = top[:keep], probs[:keep] / probs[:keep].sum()
    return int(top[rng.choice(len(top), p=probs)])
