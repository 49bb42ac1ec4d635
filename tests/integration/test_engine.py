"""The engine loop on a real (tiny) model: concurrency, caps, cancellation, no leaks."""

import math
import threading
import time

import pytest

from allinone.backends.base import EngineOverloadedError, GenerationParams


def chat_prompt(backend, text):
    return backend.render_chat(
        [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": text},
        ],
        1,
    )


def collect(handle):
    parts, fin = [], None
    for kind, value in handle.events(timeout=120):
        if kind == "text":
            parts.append(value)
        else:
            fin = value
    return "".join(parts), fin


def assert_no_leaks(backend):
    stats = backend.stats()
    assert stats["active"] == 0 and stats["queue_depth"] == 0
    backend.loop.check_invariants()  # slots, scratch and prefix pools match the KV cells


def test_more_requests_than_sequences_all_complete_within_caps(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=2)
    handles = [
        backend.generate(
            chat_prompt(backend, f"Tell me a story about number {i}."),
            GenerationParams(max_tokens=8 + i),
        )
        for i in range(8)
    ]
    for i, h in enumerate(handles):
        text, fin = collect(h)
        assert fin.reason in ("stop", "length")
        assert fin.usage.completion_tokens <= 8 + i
        assert text.strip()
    assert_no_leaks(backend)


def test_greedy_reply_is_the_same_alone_and_under_load(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=4)
    prompt = chat_prompt(backend, "Name three colours.")
    alone, _ = collect(backend.generate(prompt, GenerationParams(max_tokens=12)))
    others = [
        backend.generate(chat_prompt(backend, f"Count to {i}."), GenerationParams(max_tokens=24))
        for i in range(3)
    ]
    loaded, _ = collect(backend.generate(prompt, GenerationParams(max_tokens=12)))
    for h in others:
        collect(h)
    assert loaded.split()[:3] == alone.split()[:3]


def test_char_cap_and_stop_strings(tiny_backend_factory):
    backend = tiny_backend_factory()
    text, fin = collect(
        backend.generate(
            chat_prompt(backend, "Write a long essay about rivers."),
            GenerationParams(max_tokens=200, max_chars=25),
        )
    )
    assert len(text) <= 25 and fin.reason == "length"
    full, _ = collect(
        backend.generate(
            chat_prompt(backend, "List the numbers 1 to 20."), GenerationParams(max_tokens=60)
        )
    )
    stop = full.strip()[4:6]
    cut, fin = collect(
        backend.generate(
            chat_prompt(backend, "List the numbers 1 to 20."),
            GenerationParams(max_tokens=60, stop=[stop]),
        )
    )
    assert stop not in cut and fin.reason == "stop"


def test_cancelled_request_frees_its_sequence(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=1)
    long = backend.generate(
        chat_prompt(backend, "Write a very long story."), GenerationParams(max_tokens=400)
    )
    events = long.events(timeout=60)
    next(events)  # generation has started and holds the only sequence
    waiting = backend.generate(chat_prompt(backend, "Say hi."), GenerationParams(max_tokens=5))
    long.cancel()
    assert long.result(timeout=60).reason == "cancelled"
    _, fin = collect(waiting)  # admitted once the cancelled one left
    assert fin.reason in ("stop", "length")
    assert backend.stats()["generated_tokens"] < 400
    assert_no_leaks(backend)


def test_full_queue_is_refused_not_crashed(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=1, max_queue=2)
    handles, refused = [], 0
    for _ in range(8):
        try:
            handles.append(
                backend.generate(chat_prompt(backend, "Hello"), GenerationParams(max_tokens=20))
            )
        except EngineOverloadedError:
            refused += 1
    assert refused >= 1
    for h in handles:
        collect(h)
    assert_no_leaks(backend)


def test_many_mixed_requests_leave_nothing_behind(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=4, max_queue=400)
    errors = []

    def worker(k):
        try:
            for i in range(25):
                p = chat_prompt(backend, f"Message {k}-{i}: is this good or bad?")
                if i % 2:
                    backend.score_choices(p, ["good", "bad", "not sure"]).result(timeout=60)
                else:
                    h = backend.generate(p, GenerationParams(max_tokens=4 + i % 7))
                    if i % 5 == 0:
                        h.cancel()
                    h.result(timeout=60)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    time.sleep(0.1)
    assert_no_leaks(backend)
    assert backend.stats()["finished"] + backend.stats()["cancelled"] == 200


def _turns(backend, reply):
    first = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Name three colours."},
    ]
    second = [
        *first,
        {"role": "assistant", "content": reply},
        {"role": "user", "content": "And three animals?"},
    ]
    return backend.render_chat(first, 1), backend.render_chat(second, 1)


@pytest.mark.parametrize("cache_mb", [128, 0])
def test_next_chat_turn_evaluates_only_its_new_tokens(tiny_backend_factory, cache_mb):
    # with the host-memory cache the first turn waits there, without it in its slot
    backend = tiny_backend_factory(parallel=2, prompt_cache_mb=cache_mb)
    p1, _ = _turns(backend, "")
    reply, fin1 = collect(backend.generate(p1, GenerationParams(max_tokens=16)))
    _, p2 = _turns(backend, reply)
    text, fin2 = collect(backend.generate(p2, GenerationParams(max_tokens=16)))
    # the whole first turn (prompt and reply) came back instead of being evaluated again
    assert fin2.usage.cached_tokens >= fin1.usage.prompt_tokens + fin1.usage.completion_tokens - 2
    assert fin2.usage.prompt_tokens > fin2.usage.cached_tokens
    # and the answer is the one a fresh evaluation of the whole conversation gives
    fresh = tiny_backend_factory(parallel=2, reuse_slots=False)
    expected, fin3 = collect(fresh.generate(p2, GenerationParams(max_tokens=16)))
    assert fin3.usage.cached_tokens < fin2.usage.cached_tokens
    assert fin3.usage.prompt_tokens == fin2.usage.prompt_tokens
    assert text == expected
    assert_no_leaks(backend)


def _conversation(backend, turns):
    messages = [{"role": "system", "content": "You are a helpful assistant."}]
    for user, reply in turns:
        messages.append({"role": "user", "content": user})
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return backend.render_chat(messages, 1)


FIRST_QUESTION = (
    "I am planning a garden with roses, tulips, lavender and sunflowers along a south wall. "
    "Which of them need the most water in a dry summer?"
)


@pytest.mark.parametrize("cache_mb", [16, 0])
def test_a_conversation_whose_slot_was_taken_comes_back_from_host_memory(
    tiny_backend_factory, cache_mb
):
    backend = tiny_backend_factory(parallel=1, prompt_cache_mb=cache_mb)
    params = GenerationParams(max_tokens=16)
    first = _conversation(backend, [(FIRST_QUESTION, None)])
    reply, fin1 = collect(backend.generate(first, params))
    # another user's chat takes the only sequence
    collect(backend.generate(chat_prompt(backend, "Tell me about the sea."), params))
    second = _conversation(backend, [(FIRST_QUESTION, reply), ("And in spring?", None)])
    text, fin2 = collect(backend.generate(second, params))
    if cache_mb:
        # the whole first turn came back from host memory instead of being evaluated again
        turn1 = fin1.usage.prompt_tokens + fin1.usage.completion_tokens
        assert fin2.usage.cached_tokens >= turn1 - 2
        assert backend.stats()["restored_tokens"] == fin2.usage.cached_tokens
        assert 0 < backend.stats()["prompt_cache_bytes"] <= 16 * 2**20
    else:
        assert fin2.usage.cached_tokens < 20  # the shared system prompt at most
        assert backend.stats()["prompt_cache_entries"] == 0
    # and the reply is the one a fresh evaluation of the whole conversation gives
    fresh = tiny_backend_factory(parallel=1, reuse_slots=False)
    expected, _ = collect(fresh.generate(second, params))
    assert text == expected
    assert_no_leaks(backend)


@pytest.mark.parametrize("cache_mb", [16, 1])
def test_a_finished_chat_waits_in_host_memory_or_if_too_big_in_its_slot(
    tiny_backend_factory, cache_mb
):
    # Cells left in idle slots would cost every later step (the attention scans every cell up
    # to the highest in use): a finished chat goes to host memory and comes back for its turn.
    # ~1.2 MB of cells for this conversation with the tiny model: a 1 MB cache cannot hold it,
    # so it keeps its cells in its slot and its next turn starts from them there.
    backend = tiny_backend_factory(parallel=1, prompt_cache_mb=cache_mb)
    params = GenerationParams(max_tokens=16)
    first = _conversation(backend, [(FIRST_QUESTION, None)])
    reply, fin1 = collect(backend.generate(first, params))
    in_memory = backend.stats()["prompt_cache_entries"]
    in_slot = backend.rt.seq_pos_max(0) >= 0
    assert (in_memory, in_slot) == ((1, False) if cache_mb > 1 else (0, True))
    second = _conversation(backend, [(FIRST_QUESTION, reply), ("And in spring?", None)])
    text, fin2 = collect(backend.generate(second, params))
    assert fin2.usage.cached_tokens >= fin1.usage.prompt_tokens + fin1.usage.completion_tokens - 2
    restored = backend.stats()["restored_tokens"]
    assert restored == (fin2.usage.cached_tokens if in_memory else 0)
    fresh = tiny_backend_factory(parallel=1, reuse_slots=False)
    assert text == collect(fresh.generate(second, params))[0]
    assert_no_leaks(backend)


def test_a_chat_pushed_out_of_host_memory_is_evaluated_again(tiny_backend_factory):
    # 2 MB holds one of these conversations (~1.2 MB each for the tiny model): the second chat
    # pushes the first out, whose next turn is then evaluated in full, with the same reply.
    backend = tiny_backend_factory(parallel=1, prompt_cache_mb=2)
    params = GenerationParams(max_tokens=16)
    other = "My flat faces north and gets little light. Which houseplants cope with shade best?"
    reply, _ = collect(backend.generate(_conversation(backend, [(FIRST_QUESTION, None)]), params))
    collect(backend.generate(_conversation(backend, [(other, None)]), params))
    second = _conversation(backend, [(FIRST_QUESTION, reply), ("And in spring?", None)])
    text, fin = collect(backend.generate(second, params))
    assert backend.health() and fin.usage.cached_tokens < 20  # the shared system prompt at most
    assert backend.stats()["prompt_cache_bytes"] <= 2 * 2**20
    fresh = tiny_backend_factory(parallel=1, reuse_slots=False)
    assert text == collect(fresh.generate(second, params))[0]
    assert_no_leaks(backend)


def _probs(logprobs):
    top = max(logprobs)
    weights = [math.exp(lp - top) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def test_requests_missing_the_same_new_prefix_together_cache_it_once(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=4)
    texts = ["The room was clean.", "The food was cold.", "Great staff!", "Awful noise."]
    prompts = [chat_prompt(backend, f"Is this good or bad? {t}") for t in texts]
    together = [backend.score_choices(p, ["good", "bad"]) for p in prompts]
    together = [h.result(timeout=60) for h in together]
    # one prefix sequence holds it; the reservations of the others were given back (the pool
    # check: every prefix sequence is free or cached, and the budget counts cached ones only)
    assert backend.stats()["cached_prefixes"] == 1
    backend.loop.check_invariants()
    for p, first in zip(prompts, together, strict=True):
        again = backend.score_choices(p, ["good", "bad"]).result(timeout=60)
        assert again.usage.cached_tokens > 0
        # batch composition moves the last bits (see test_batching): the tiny model's label
        # probabilities agree within 0.03
        assert _probs(again.result) == pytest.approx(_probs(first.result), abs=0.03)
    assert_no_leaks(backend)


def test_a_classification_never_reuses_what_ran_before(tiny_backend_factory):
    backend = tiny_backend_factory(parallel=1)
    p = chat_prompt(backend, "Is this good or bad? The room was clean.")
    first = backend.score_choices(p, ["good", "bad"]).result(timeout=60)
    collect(backend.generate(p, GenerationParams(max_tokens=4)))  # a chat with the same tokens
    again = backend.score_choices(p, ["good", "bad"]).result(timeout=60)
    assert again.result == first.result  # bit-for-bit the same probabilities
    # the first evaluated the task prefix (in its own sequence, then shared); the second
    # took it from the cache
    assert first.usage.cached_tokens == 0 < again.usage.cached_tokens
    assert backend.stats()["reused_tokens"] == 0
    assert_no_leaks(backend)


def test_prompt_longer_than_a_sequence_is_refused(tiny_backend_factory):
    from allinone.backends.base import PromptTooLongError

    backend = tiny_backend_factory(ctx_per_seq=128)
    with pytest.raises(PromptTooLongError, match="ALLINONE_CTX_PER_SEQ"):
        backend.generate(chat_prompt(backend, "word " * 300), GenerationParams())
