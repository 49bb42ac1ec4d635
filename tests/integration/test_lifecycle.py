"""A request's life from route to engine: one request's failure stays its own, a dead engine
ends the process, and disconnects and deadlines cancel the engine work on every route."""

from __future__ import annotations

import pytest
from test_engine import assert_no_leaks, chat_prompt, collect

from allinone.backends import scheduler as sched_mod
from allinone.backends.base import BackendError, GenerationParams


def test_a_failure_in_one_request_leaves_its_neighbours_in_the_same_step_running(
    tiny_backend_factory, monkeypatch
):
    backend = tiny_backend_factory(parallel=4)
    real = sched_mod.sample_token

    def poisoned(logits, params, rng):
        if params.temperature == 0.77:  # this request's processing raises, mid-generation
            raise FloatingPointError("injected")
        return real(logits, params, rng)

    monkeypatch.setattr(sched_mod, "sample_token", poisoned)
    good = [
        backend.generate(chat_prompt(backend, f"Count to {i}."), GenerationParams(max_tokens=16))
        for i in range(3)
    ]
    bad = backend.generate(
        chat_prompt(backend, "Say hello."), GenerationParams(max_tokens=16, temperature=0.77)
    )
    with pytest.raises(BackendError, match="injected"):
        collect(bad)
    for h in good:
        text, fin = collect(h)
        assert fin.reason in ("stop", "length") and text.strip()
    assert backend.health()  # the loop lives on
    text, fin = collect(
        backend.generate(chat_prompt(backend, "Name a colour."), GenerationParams(max_tokens=8))
    )
    assert text.strip()
    assert backend.stats()["failed"] == 1
    assert_no_leaks(backend)


def test_a_temperature_too_small_to_divide_by_is_served_greedy(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    prompt = chat_prompt(backend, "The capital of France is")
    greedy, _ = collect(backend.generate(prompt, GenerationParams(max_tokens=12)))
    for t in (5e-324, 1e-308):
        text, fin = collect(
            backend.generate(prompt, GenerationParams(max_tokens=12, temperature=t, seed=1))
        )
        assert fin.reason in ("stop", "length") and text == greedy
    assert backend.health()
