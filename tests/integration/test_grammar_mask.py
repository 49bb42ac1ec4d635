"""The grammar matcher's single-token check agrees with its full mask (the engine's greedy
fast path relies on it), on the tiny model's real vocabulary."""

from __future__ import annotations

import numpy as np


def test_allows_agrees_with_the_mask_at_every_step_of_a_reply(tiny_backend_factory):
    backend = tiny_backend_factory()
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "n": {"type": "integer"}},
        "required": ["name", "n"],
    }
    matcher = backend.json_grammar(schema).matcher()
    rng = np.random.default_rng(0)
    for tok in backend.tokenize('{"name":"Ana","n":42}'):
        allowed = matcher.allowed()
        probe = np.unique(np.concatenate([np.flatnonzero(allowed), rng.choice(allowed.size, 300)]))
        assert [matcher.allows(int(t)) for t in probe] == [bool(allowed[t]) for t in probe]
        assert matcher.allows(tok) and not matcher.allows(-1)
        matcher.accept(tok)
