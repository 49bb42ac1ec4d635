"""The in-process vLLM backend: runs only where vLLM and a CUDA GPU are present, with a local
Hugging Face model folder in ALLINONE_VLLM_TEST_MODEL (GPU machines here reach no hub)."""

import os

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU", allow_module_level=True)
MODEL = os.environ.get("ALLINONE_VLLM_TEST_MODEL")
if not MODEL:
    pytest.skip("set ALLINONE_VLLM_TEST_MODEL to a local model folder", allow_module_level=True)


@pytest.fixture(scope="module")
def vllm_service():
    from allinone.backends.vllm_backend import VLLMBackend
    from allinone.service import TaskService
    from allinone.settings import EngineSettings
    from allinone.tasks import TaskRegistry

    backend = VLLMBackend(MODEL, EngineSettings(ctx_per_seq=2048, gpu_memory_utilization=0.5), "v")
    backend.load()
    yield TaskService(backend, TaskRegistry.load([]), 64)
    backend.close()


def test_constrained_labels_with_probabilities(vllm_service):
    results = vllm_service.classify("sentiment", ["这家酒店太差了，房间又脏又吵", "非常满意"])
    assert [r.label for r in results] == ["负面", "正面"]
    for r in results:
        assert sum(r.scores.values()) == pytest.approx(1.0, abs=1e-6)


def test_generation_is_capped(vllm_service):
    from allinone.backends.base import GenerationParams

    b = vllm_service.backend
    prompt = b.render_chat([{"role": "user", "content": "写一首长诗"}], 0)
    fin = b.generate(prompt, GenerationParams(max_tokens=64, max_chars=20)).result(timeout=120)
    assert 0 < len(fin.result) <= 20
