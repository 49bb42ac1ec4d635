"""The `openai` backend against a real upstream: llama-cpp-python's own OpenAI server on loopback,
running the default model. Tasks and the API run in our server; the model runs upstream."""

import subprocess
import sys
import time

import httpx
import pytest

from allinone.backends.base import PromptTooLongError, UpstreamError, UpstreamTimeoutError
from allinone.backends.remote import OpenAIRemoteBackend, choice_grammar, label_logprobs
from allinone.errors import to_api_error
from allinone.settings import EngineSettings, ModelSettings
from conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def upstream(default_model_path, tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("upstream") / "upstream.log", "w+")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(default_model_path),
            "--model_alias",
            "qwen-upstream",
            "--n_ctx",
            "2048",
            "--n_threads",
            "2",
            "--port",
            str(port),
            "--verbose",
            "False",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"llama_cpp.server exited:\n{log.read()}")
        time.sleep(0.2)
    yield proc, url
    proc.terminate()
    proc.wait(30)
    log.close()


@pytest.fixture(scope="module")
def front(upstream):
    _, url = upstream
    srv = ServerProcess(
        "default",
        {"ALLINONE_BACKEND": "openai", "ALLINONE_UPSTREAM": url, "ALLINONE_PARALLEL": "2"},
    )
    srv.wait_ready()
    yield srv
    srv.stop()


def test_classification_is_constrained_by_the_upstream(front):
    r = httpx.post(
        f"{front.url}/v1/classify",
        timeout=120,
        json={"task": "sentiment", "input": ["这家酒店太差了，房间又脏又吵", "非常满意，服务很好"]},
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    labels = [x["label"] for x in results]
    assert labels == ["负面", "正面"]
    for x in results:
        assert sum(x["scores"].values()) == pytest.approx(1.0, abs=1e-6)
    models = httpx.get(f"{front.url}/v1/models", timeout=10).json()["data"]
    assert "qwen-upstream" in {m["id"] for m in models}


def test_chat_through_the_upstream_keeps_the_task_caps(front):
    r = httpx.post(
        f"{front.url}/v1/chat/completions",
        timeout=120,
        json={"model": "chat", "messages": [{"role": "user", "content": "介绍一下你自己"}]},
    )
    assert r.status_code == 200, r.text
    reply = r.json()["choices"][0]["message"]["content"]
    assert 0 < len(reply) <= 60  # the chat task's reply cap
    with httpx.stream(
        "POST",
        f"{front.url}/v1/chat/completions",
        timeout=120,
        json={
            "model": "qwen-upstream",
            "stream": True,
            "max_tokens": 8,
            "messages": [{"role": "user", "content": "Say hi"}],
        },
    ) as s:
        lines = [x for x in s.iter_lines() if x.startswith("data:")]
    assert lines[-1] == "data: [DONE]" and len(lines) > 2


def test_timeouts_and_unreachable_upstreams_map_to_504_and_502(upstream):
    _, url = upstream
    slow = OpenAIRemoteBackend(
        ModelSettings(upstream=url, upstream_timeout_s=0.5), EngineSettings(parallel=1)
    )
    slow.load()  # listing models is quick; evaluating ~1,500 prompt tokens takes seconds
    long = slow.render_chat([{"role": "user", "content": "很好 " * 450}], 0)
    with pytest.raises(UpstreamTimeoutError) as exc:
        slow.score_choices(long, ["正面", "负面"]).result(timeout=60)
    assert to_api_error(exc.value).status == 504
    slow.close()
    down = OpenAIRemoteBackend(
        ModelSettings(upstream=f"http://127.0.0.1:{free_port()}"), EngineSettings(parallel=1)
    )
    with pytest.raises(UpstreamError, match="unreachable") as exc:
        down.load()
    assert to_api_error(exc.value).status == 502


def test_a_prompt_beyond_the_upstream_context_is_the_callers_400(upstream):
    _, url = upstream
    b = OpenAIRemoteBackend(ModelSettings(upstream=url), EngineSettings(parallel=1))
    b.load()
    huge = b.render_chat([{"role": "user", "content": "很好 " * 1500}], 0)
    with pytest.raises(PromptTooLongError, match="context"):
        b.score_choices(huge, ["正面", "负面"]).result(timeout=60)
    b.close()


def test_unconstrained_answers_that_are_no_label_are_a_clear_error(upstream):
    # logprobs mode sends no constraint: this model answers with a sentence whose first token
    # starts no label, so there is nothing to score and the error says what to change.
    _, url = upstream
    b = OpenAIRemoteBackend(
        ModelSettings(upstream=url, choice_mode="logprobs"), EngineSettings(parallel=1)
    )
    b.load()
    prompt = b.render_chat(
        [
            {"role": "system", "content": "评论的情感是正面还是负面？"},
            {"role": "user", "content": "太差了，再也不来了"},
        ],
        1,
    )
    with pytest.raises(UpstreamError, match=r"not one of .*ALLINONE_CHOICE_MODE"):
        b.score_choices(prompt, ["正面", "负面"]).result(timeout=60)
    b.close()


def test_upstream_that_goes_down_gives_502_and_the_server_keeps_serving(front, upstream):
    proc, _ = upstream
    proc.terminate()
    proc.wait(30)
    r = httpx.post(
        f"{front.url}/v1/classify", json={"task": "sentiment", "input": "不错"}, timeout=60
    )
    assert r.status_code == 502, r.text
    assert r.json()["error"]["type"] == "upstream_error"
    assert httpx.get(f"{front.url}/health", timeout=10).status_code == 200


def test_label_scores_from_top_logprobs():
    assert label_logprobs(["正面", "负面"], "正面", {"正": -0.1, "负": -2.5}) == [-0.1, -2.5]
    # labels sharing a first token cannot be told apart by one token: the choice takes it all
    assert label_logprobs(["ab", "ac"], "ac", {"a": -0.1}) == [float("-inf"), 0.0]
    assert label_logprobs(["x", "y"], "y", None) == [float("-inf"), 0.0]
    assert choice_grammar(['say "hi"', "no"]) == 'root ::= "say \\"hi\\"" | "no"'
