"""Chat on the real default model: non-empty replies within the task's caps, bounded history."""

from allinone.backends.base import GenerationParams


def reply(service, task_name, messages, **kw):
    task = service.tasks.get(task_name) if task_name else None
    plan = service.plan_chat(task, messages, **kw)
    parts, fin = [], None
    for kind, value in service.submit_chat(plan)[0].events(timeout=120):
        if kind == "text":
            parts.append(value)
        else:
            fin = value
    return "".join(parts), fin, plan


def test_chat_task_reply_is_non_empty_and_within_60_chars(service):
    for question in [
        "你好，请介绍一下北京。",
        "请详细讲讲长城的历史，越详细越好。",
        "Tell me about Paris.",
    ]:
        text, fin, _ = reply(service, "chat", [{"role": "user", "content": question}])
        assert text.strip()
        assert len(text) <= 60
        assert fin.usage.completion_tokens <= service.tasks.get("chat").output.max_tokens


def test_multi_turn_history_is_used_and_bounded(service):
    messages = [
        {"role": "user", "content": "我的名字叫小明。"},
        {"role": "assistant", "content": "你好，小明！"},
        {"role": "user", "content": "我叫什么名字？"},
    ]
    text, _, plan = reply(service, "chat", messages)
    assert "小明" in text
    long_history = []
    for i in range(200):
        long_history += [
            {"role": "user", "content": f"第{i}个问题：今天天气怎么样？"},
            {"role": "assistant", "content": "今天天气晴朗，适合出门散步。"},
        ]
    long_history.append({"role": "user", "content": "谢谢！"})
    text, _, plan = reply(service, "chat", long_history)
    assert plan.dropped_messages > 300  # the 1024-token budget keeps only the newest turns
    assert text.strip()


def test_raw_model_chat_honours_max_tokens_and_stop(service):
    text, fin, _ = reply(
        service, None, [{"role": "user", "content": "Count from 1 to 30."}], max_tokens=5
    )
    assert fin.reason == "length" and fin.usage.completion_tokens == 5
    text, fin, _ = reply(
        service,
        None,
        [{"role": "user", "content": "Count from 1 to 30, separated by commas."}],
        stop=["5"],
        max_tokens=100,
    )
    assert "5" not in text and fin.reason == "stop"


def test_sampling_with_a_seed_is_reproducible(service):
    backend = service.backend
    prompt = backend.render_chat([{"role": "user", "content": "Write a poem about the sea."}], 0)

    def run(seed):
        h = backend.generate(prompt, GenerationParams(max_tokens=20, temperature=0.9, seed=seed))
        return "".join(v for k, v in h.events(timeout=60) if k == "text")

    first = run(7)
    # a chat in between leaves its cells in the engine for its next turn
    other = backend.render_chat([{"role": "user", "content": "Name a colour."}], 0)
    list(backend.generate(other, GenerationParams(max_tokens=8)).events(timeout=60))
    assert run(7) == first
