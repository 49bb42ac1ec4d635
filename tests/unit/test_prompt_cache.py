"""The host-memory cache of finished chats: longest match, no duplicates, bounded bytes."""

from allinone.backends.llama_cpp.prompt_cache import PromptCache


def data(n: int) -> bytearray:
    return bytearray(n)


def test_the_longest_shared_start_wins_and_stops_at_the_limit():
    cache = PromptCache(1000)
    cache.put([1, 2, 3, 4], data(10))
    cache.put([1, 2, 9, 9, 9, 9], data(10))
    key, n = cache.match([1, 2, 3, 4, 5], limit=4)
    assert n == 4 and cache.get(key).tokens.tolist() == [1, 2, 3, 4]
    assert cache.match([1, 2, 3, 4, 5], limit=3)[1] == 3
    assert cache.match([7, 7], limit=2) == (-1, 0)


def test_a_longer_turn_of_the_same_chat_replaces_the_shorter():
    cache = PromptCache(1000)
    cache.put([1, 2, 3], data(30))
    cache.put([1, 2, 3, 4, 5], data(50))
    assert len(cache) == 1 and cache.bytes == 50
    assert cache.holds([1, 2, 3]) and cache.holds([1, 2, 3, 4, 5])
    # a shorter piece of a chat already held adds nothing
    assert cache.put([1, 2], data(20)) and len(cache) == 1 and cache.bytes == 50
    assert not cache.holds([1, 2, 3, 4, 5, 6])


def test_bytes_stay_within_the_budget_least_recently_used_out():
    cache = PromptCache(100)
    cache.put([1], data(40))
    cache.put([2], data(40))
    cache.get(cache.match([1], 1)[0])  # [1] is now the most recently used
    cache.put([3], data(40))
    assert cache.bytes == 80
    assert cache.holds([1]) and cache.holds([3]) and not cache.holds([2])
    assert not cache.put([4], data(101))  # bigger than the whole budget: not kept
    assert cache.bytes == 80
