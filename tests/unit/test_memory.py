"""The memory sampler reads real process memory and enforces the budget."""

from allinone.observability.memory import HARD_LIMIT_EXIT_CODE, MemorySampler, read_memory


def test_reads_this_process():
    s = read_memory()
    assert s.rss > 10_000_000 and s.rss_anon > 0 and s.swap >= 0
    assert s.anon_plus_swap == s.rss_anon + s.swap


def test_soft_limit_refuses_and_recovers():
    seen = []
    sampler = MemorySampler(soft_limit_bytes=1, on_sample=seen.append)
    sampler.sample()
    assert sampler.over_soft and seen
    sampler.soft = 1 << 50
    sampler.sample()
    assert not sampler.over_soft


def test_hard_limit_exits_non_zero_for_the_supervisor():
    codes = []
    sampler = MemorySampler(hard_limit_bytes=1, exit_fn=codes.append)
    sampler.sample()
    assert codes == [HARD_LIMIT_EXIT_CODE] and HARD_LIMIT_EXIT_CODE != 0
