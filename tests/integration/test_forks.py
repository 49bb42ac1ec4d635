"""n choices on a real (tiny) model: the prompt is evaluated once and each choice decodes from a
copy of its cells; grammars, logprobs and seeds per choice; cancellation frees every slot."""

import json

from allinone.backends.base import GenerationParams


def _prompt(backend, text="Write a short poem about the sea."):
    return backend.render_chat([{"role": "user", "content": text}], 0)


def test_n_choices_evaluate_the_prompt_once(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=4)
    prompt = _prompt(backend)
    before = backend.stats()["prompt_tokens"]
    handles = backend.generate_n(prompt, GenerationParams(max_tokens=12, temperature=1.0), 3)
    done = [h.result(timeout=120) for h in handles]
    n_prompt = done[0].usage.prompt_tokens
    assert backend.stats()["prompt_tokens"] - before == n_prompt  # once, not three times
    assert all(d.usage.cached_tokens == n_prompt for d in done[1:])
    assert len({d.result for d in done}) >= 2  # fresh samples differ
    backend.loop.check_invariants()


def test_seeded_choices_repeat_as_a_set_and_greedy_choices_agree(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=3)
    prompt = _prompt(backend)

    def run(**kw):
        params = GenerationParams(max_tokens=10, **kw)
        return [h.result(timeout=120).result for h in backend.generate_n(prompt, params, 3)]

    assert run(temperature=1.0, seed=5) == run(temperature=1.0, seed=5)
    greedy = run(temperature=0.0)
    assert len(set(greedy)) == 1
    backend.loop.check_invariants()


def test_each_choice_follows_the_grammar_and_reports_logprobs(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    grammar = backend.json_grammar(
        {
            "type": "object",
            "properties": {"ok": {"enum": ["yes", "no"]}},
            "required": ["ok"],
            "additionalProperties": False,
        }
    )
    params = GenerationParams(
        max_tokens=20, temperature=1.0, grammar=grammar, logprobs=True, top_logprobs=2
    )
    for h in backend.generate_n(_prompt(backend, "Is the sea blue?"), params, 2):
        fin = h.result(timeout=120)
        assert fin.reason == "stop" and json.loads(fin.result)["ok"] in ("yes", "no")
        assert len(fin.logprobs) == fin.usage.completion_tokens
    backend.loop.check_invariants()


def test_cancelling_choices_frees_every_slot_and_a_wide_n_waits_its_turn(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    prompt = _prompt(backend)
    busy = backend.generate(prompt, GenerationParams(max_tokens=30))
    wide = backend.generate_n(prompt, GenerationParams(max_tokens=30), 2)  # needs both slots
    for h in wide:
        h.cancel()
    assert busy.result(timeout=120).reason in ("stop", "length")
    assert {h.result(timeout=120).reason for h in wide} == {"cancelled"}
    again = backend.generate_n(prompt, GenerationParams(max_tokens=4), 2)
    assert all(h.result(timeout=120).reason in ("stop", "length") for h in again)
    backend.loop.check_invariants()
