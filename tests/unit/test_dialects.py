"""Each wire format answers errors in its own shape, also the errors raised before any route
runs (a missing API key): the dialect is found from the route a path belongs to."""

import pytest
from fastapi.testclient import TestClient

from allinone.api import create_app
from allinone.settings import Settings
from allinone.tasks import TaskRegistry


@pytest.fixture(scope="module")
def client():
    settings = Settings()
    settings.server.api_keys = ["k1"]
    app = create_app(settings, backend_factory=lambda: None, task_registry=TaskRegistry.load())
    return TestClient(app)


def test_a_missing_key_is_answered_in_each_families_shape(client):
    r = client.post("/v1/messages", json={})
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    r = client.post("/v1/systemone", json={})
    assert r.status_code == 401 and r.json()["detail"]["error_type"] == "authentication_error"
    for path in ("/v1/chat/completions", "/v1/responses", "/v1/decisions", "/v1/nope"):
        r = client.post(path, json={})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"


def test_anthropics_key_header_is_accepted(client):
    # past the key check: the model is not loaded, so the answer is Anthropic's 503
    r = client.post("/v1/messages/count_tokens", json={}, headers={"x-api-key": "k1"})
    assert r.status_code != 401 and r.json()["type"] == "error"
    r = client.post("/v1/messages", json={}, headers={"x-api-key": "wrong"})
    assert r.status_code == 401
