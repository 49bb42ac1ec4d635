"""Branch scoring on a real (tiny) model: one body evaluated once, many question branches."""

import math

from allinone.backends.base import Prompt, ScoreBranch, Segment


def _prompt(backend, text):
    return backend.render_chat(
        [{"role": "system", "content": "Judge the input."}, {"role": "user", "content": text}], 1
    )


def _split(prompt, at):
    """The body split inside its user content (what the decision service does)."""
    body = list(prompt.body)
    k = next(i for i, s in enumerate(body) if not s.special)
    text = body[k].text
    head = (*body[:k], Segment(text[:at]))
    tail = (Segment(text[at:]), *body[k + 1 :])
    return Prompt(prompt.prefix, head), tail


def _p_first(lps):
    return 1 / (1 + math.exp(lps[1] - lps[0]))


LABELS = ["A", "B", "AA", "AB", "yes", "maybe later"]  # one-token and several-token labels


def test_branches_give_what_separate_requests_give(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    head = "Input:\nThe parcel arrived broken and support never answered.\n\n"
    blocks = [f"Question {k}: is it about topic {k}?\nAnswer with a code." for k in range(5)]
    prompt, _ = _split(_prompt(backend, head + blocks[0]), len(head))
    branches = []
    for b in blocks:
        _, suffix = _split(_prompt(backend, head + b), len(head))
        branches.append(ScoreBranch(suffix, tuple(LABELS)))
    fin = backend.score_branches(prompt, branches).result(timeout=120)
    assert len(fin.result) == len(blocks)
    body_tokens = fin.usage.prompt_tokens
    for br, got in zip(branches, fin.result, strict=True):
        whole = Prompt(prompt.prefix, (*prompt.body, *br.suffix))  # the same tokens
        alone = backend.score_choices(whole, LABELS[:2]).result(timeout=120)
        # The same answer as a plain classification of the whole text: batch shape moves the
        # log-probabilities by up to ~0.25 here (measured: 5 identical branches in one step
        # differ by that much from each other), their normalised probabilities by ~0.01.
        assert math.isclose(_p_first(got[:2]), _p_first(alone.result), abs_tol=0.03)
        assert all(lp < 0 for lp in got)
        body_tokens -= alone.usage.prompt_tokens
    # usage counts the shared part once: the sum of separate prompts is larger
    assert body_tokens < 0
    assert backend.stats()["active"] == 0
    backend.loop.check_invariants()


def test_more_branches_than_scratch_sequences_all_finish(tiny_backend_factory):
    # parallel 1 x max_choices 2 = 2 scratch sequences for 12 branches of several-token labels
    backend = tiny_backend_factory(parallel=1, max_choices=2)
    head = "Input:\nok\n\n"
    prompt, _ = _split(_prompt(backend, head + "Q"), len(head))
    branches = [ScoreBranch((Segment(f"Q{k}?"),), ("AA", "AB", "BA", "BB")) for k in range(12)]
    handles = [backend.score_branches(prompt, branches) for _ in range(3)]
    results = [h.result(timeout=300).result for h in handles]
    assert all(len(r) == 12 and all(len(x) == 4 for x in r) for r in results)
    assert results[0] == results[1] == results[2]  # deterministic, whatever ran beside it
    backend.loop.check_invariants()


def test_cancelled_branch_request_frees_its_sequences(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=1, max_choices=4)
    prompt = _prompt(backend, "x " * 200)
    branches = [ScoreBranch((Segment("y " * 100),), ("AA", "BB")) for _ in range(20)]
    h = backend.score_branches(prompt, branches)
    h.cancel()
    fin = h.result(timeout=120)
    assert fin.reason == "cancelled"
    backend.loop.check_invariants()
