"""Readiness: /health answers at once, /ready is 503 until the model is loaded.

The backend here is a stand-in that only blocks in load(): it tests the HTTP layer's readiness
logic, not any model feature."""

import threading

from fastapi.testclient import TestClient

from allinone.api import create_app
from allinone.backends.base import Backend
from allinone.settings import ServerSettings, Settings
from allinone.tasks import TaskRegistry


class SlowLoadingBackend(Backend):
    name = "stand-in"

    def __init__(self, gate: threading.Event, fail: bool = False):
        self.gate, self.fail, self.loaded = gate, fail, False

    def load(self):
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("weights are corrupt")
        self.loaded = True

    def health(self):
        return self.loaded

    model_id = "stand-in"
    context_tokens = 1024

    def count_tokens(self, text):
        return len(text)

    def render_chat(self, messages, n_prefix_messages):
        raise NotImplementedError

    def score_choices(self, prompt, choices):
        raise NotImplementedError

    def generate(self, prompt, params):
        raise NotImplementedError

    def close(self):
        pass


def make(gate, fail=False, settings=None):
    return create_app(
        settings or Settings(),
        backend_factory=lambda: SlowLoadingBackend(gate, fail),
        task_registry=TaskRegistry.load(),
    )


def test_ready_is_503_until_loaded_then_200():
    gate = threading.Event()
    with TestClient(make(gate)) as client:
        assert client.get("/health").status_code == 200
        r = client.get("/ready")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"
        assert r.headers["retry-after"] == "1"
        r = client.post("/v1/classify", json={"input": "hi"})
        assert r.status_code == 503
        gate.set()
        app_state = client.app.state.server
        assert app_state.lifecycle.ready.wait(5)
        assert client.get("/ready").status_code == 200


def test_failed_load_is_reported_by_ready():
    gate = threading.Event()
    gate.set()
    with TestClient(make(gate, fail=True)) as client:
        state = client.app.state.server
        for _ in range(50):
            if state.lifecycle.load_error:
                break
            threading.Event().wait(0.05)
        r = client.get("/ready")
        assert r.status_code == 503 and "weights are corrupt" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 200


def test_a_bug_is_a_generic_500_that_closes_the_connection():
    # Starlette re-raises a bug after its 500 is sent and uvicorn drops the connection: the
    # answer must tell a keep-alive client not to send its next request on it (a reset).
    gate = threading.Event()
    gate.set()
    app = make(gate)

    @app.get("/v1/boom")
    async def boom():
        raise RuntimeError("secret detail")

    with TestClient(app, raise_server_exceptions=False) as client:
        r = client.get("/v1/boom")
    assert r.status_code == 500
    assert r.headers["connection"] == "close"
    assert r.json()["error"]["type"] == "server_error"
    assert "secret detail" not in r.text


def test_ready_says_where_the_memory_budget_comes_from():
    gate = threading.Event()
    gate.set()
    # far above this test process's own memory (the whole suite's models live in it), so the
    # limit is reported, not tripped
    settings = Settings(server=ServerSettings(memory_soft_limit_mb=1_000_000))
    with TestClient(make(gate, settings=settings)) as client:
        assert client.app.state.server.lifecycle.ready.wait(5)
        memory = client.get("/ready").json()["memory"]
    assert memory["soft_limit_mb"] == 1_000_000 and memory["hard_limit_mb"] is None
    assert memory["source"].startswith("settings")
