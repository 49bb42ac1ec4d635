"""Shared fixtures: real models (tiny for plumbing, default for behaviour) and a real server."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Settings come from the environment and a .env file: keep a developer's (API keys, parallel,
# prompt cache ...) out of the tests and of the servers they start. Only the cache location,
# which `make` sets, passes through. This runs before any allinone module is imported.
for _name in [n for n in os.environ if n.startswith("ALLINONE_") and n != "ALLINONE_CACHE_DIR"]:
    del os.environ[_name]
os.environ["ALLINONE_ENV_FILE"] = os.devnull

from allinone.models import ensure_model  # noqa: E402
from allinone.server_process import ServerProcess, free_port  # noqa: E402, F401 - for the tests

ROOT = Path(__file__).resolve().parents[1]


def pytest_collection_modifyitems(config, items):
    """Mark tests by folder: tests/unit -> unit, tests/integration -> integration."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        if "unit" in parts:
            item.add_marker(pytest.mark.unit)
        elif "integration" in parts:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def default_model_path() -> Path:
    """The real default model (fetched and verified by `make test` before pytest runs)."""
    return ensure_model("default")


@pytest.fixture(scope="session")
def tiny_model_path() -> Path:
    """SmolLM2-135M: a real but tiny model, for engine plumbing only."""
    return ensure_model("tiny")


def _engine_settings(**over):
    from allinone.settings import EngineSettings

    # no background grammar index: in-process backends come and go; tests that constrain
    # build it on first use
    base = {"threads": 2, "parallel": 4, "ctx_per_seq": 1024, "max_queue": 64}
    base["grammar_prewarm"] = False
    base.update(over)
    return EngineSettings(**base)


@pytest.fixture(scope="session")
def default_backend(default_model_path):
    """The default model loaded once for the whole session."""
    from allinone.backends.llama_cpp import LlamaCppBackend

    backend = LlamaCppBackend(default_model_path, _engine_settings(), "qwen-default")
    backend.load()
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def service(default_backend):
    """Task service over the default model with the built-in tasks."""
    from allinone.service import TaskService
    from allinone.tasks import TaskRegistry

    return TaskService(default_backend, TaskRegistry.load())


@pytest.fixture
def tiny_backend_factory(tiny_model_path):
    """Build (and later close) tiny-model backends with custom engine settings."""
    from allinone.backends.llama_cpp import LlamaCppBackend

    made = []

    def make(**over):
        b = LlamaCppBackend(tiny_model_path, _engine_settings(**over), "tiny")
        b.load()
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


@pytest.fixture(scope="session")
def server(default_model_path):
    """A real server running the default model; shared by the API tests."""
    with ServerProcess.running(
        str(default_model_path), {"ALLINONE_MODEL_ID": "qwen-default"}
    ) as srv:
        yield srv


@pytest.fixture
def tiny_server(tiny_model_path):
    """Start tiny-model servers (``tiny_server(ALLINONE_X="...")``, model id ``m``); each is
    stopped after the test."""
    servers = []

    def start(**env):
        srv = ServerProcess(str(tiny_model_path), {"ALLINONE_MODEL_ID": "m", **env})
        srv.wait_ready()
        servers.append(srv)
        return srv

    yield start
    for srv in servers:
        if srv.proc.poll() is None:
            srv.stop()
