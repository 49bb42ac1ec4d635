"""Shared fixtures: real models (tiny for plumbing, default for behaviour) and a real server."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest

from allinone.models import ensure_model

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

    base = {"threads": 2, "parallel": 4, "ctx_per_seq": 1024, "max_queue": 64}
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`allinone serve` in a subprocess on a free loopback port."""

    def __init__(self, model: str, extra_env: dict[str, str] | None = None, args=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "ALLINONE_MODEL": model,
            "ALLINONE_THREADS": "2",
            "ALLINONE_CTX_PER_SEQ": "1024",
            **(extra_env or {}),
        }
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
            "w+", prefix="allinone-server-", suffix=".log"
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "allinone", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                # /health says when the model is loaded, even if /ready refuses (memory limit).
                if httpx.get(f"{self.url}/health", timeout=2).json().get("ready"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        return out


@pytest.fixture(scope="session")
def server(default_model_path):
    """A real server running the default model; shared by the API tests."""
    srv = ServerProcess(str(default_model_path), {"ALLINONE_MODEL_ID": "qwen-default"})
    srv.wait_ready()
    yield srv
    srv.stop()
