"""The transformers backend (PyTorch FP32, the original design's stack) behind the same tasks."""

import pytest

from allinone.backends.base import GenerationParams, PromptTooLongError

pytest.importorskip("torch")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_service(default_model_path):
    from allinone.backends.transformers_backend import TransformersBackend
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    backend = TransformersBackend(
        default_model_path, EngineSettings(threads=2, ctx_per_seq=1024), "hf"
    )
    backend.load()  # converts the GGUF once into ~/.cache/allinone/hf/ (about 40 s)
    yield TaskService(backend, TaskRegistry.load([]), 64)
    backend.close()


def test_same_labels_as_llama_cpp_with_probabilities(hf_service, service):
    texts = [
        "这家酒店太差了，房间又脏又吵",
        "非常满意，服务很好，下次还来",
        "一般般吧，没什么特别的",
    ]
    ours = [r.label for r in service.classify("sentiment", texts[:2])]
    hf = hf_service.classify("sentiment", texts)
    assert [r.label for r in hf[:2]] == ours == ["负面", "正面"]
    for r in hf:
        assert r.label in ("正面", "负面")
        assert sum(r.scores.values()) == pytest.approx(1.0, abs=1e-6)
    again = hf_service.classify("sentiment", texts)
    assert [r.scores for r in again] == [r.scores for r in hf]  # deterministic
    en = hf_service.classify("sentiment-en", ["What a wonderful film, I loved it"])
    assert en[0].label == "positive"


def test_task_prefix_is_reused(hf_service):
    hf_service.classify("sentiment", ["服务很好"])
    second = hf_service.classify("sentiment", ["服务很差"])[0]
    assert second.cached_tokens > 0  # the task prefix came from the cache
    assert hf_service.backend.stats()["cached_prefixes"] >= 1


def test_chat_reply_is_capped_and_streamed(hf_service):
    backend = hf_service.backend
    prompt = backend.render_chat([{"role": "user", "content": "写一首关于春天的长诗"}], 0)
    handle = backend.generate(prompt, GenerationParams(max_tokens=64, max_chars=20))
    pieces = [v for kind, v in handle.events(timeout=120) if kind == "text"]
    assert 0 < len("".join(pieces)) <= 20
    with pytest.raises(PromptTooLongError, match="CTX_PER_SEQ"):
        backend.generate(
            backend.render_chat([{"role": "user", "content": "很好" * 2000}], 0),
            GenerationParams(max_tokens=8),
        )
