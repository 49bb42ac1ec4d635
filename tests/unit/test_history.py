"""Chat history is bounded by a token budget, oldest turns first."""

from allinone.service import bound_history


def count(text: str) -> int:
    return len(text)


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


def test_keeps_everything_under_budget():
    m = msgs(("system", "s" * 500), ("user", "aa"), ("assistant", "bb"), ("user", "cc"))
    kept, dropped = bound_history(m, 100, count)
    assert kept == m and dropped == 0


def test_drops_oldest_first_and_keeps_system_and_last():
    m = msgs(
        ("system", "sys"),
        ("user", "1" * 10),
        ("assistant", "2" * 10),
        ("user", "3" * 10),
        ("assistant", "4" * 10),
        ("user", "5" * 10),
    )
    kept, dropped = bound_history(m, 30, count)
    assert [x["content"][0] for x in kept] == ["s", "3", "4", "5"]
    assert dropped == 2


def test_never_starts_with_an_assistant_turn():
    m = msgs(("user", "1" * 10), ("assistant", "2" * 10), ("user", "3" * 10))
    kept, dropped = bound_history(m, 20, count)
    assert [x["role"] for x in kept] == ["user"] and dropped == 2


def test_last_message_always_kept_even_over_budget():
    m = msgs(("user", "x" * 100))
    kept, _ = bound_history(m, 10, count)
    assert kept == m
