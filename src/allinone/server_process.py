"""`allinone serve` in a child process on a free loopback port: for `allinone soak`, the tests
and the benchmarks (one helper instead of three)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A server child process. ``model``: catalog name or GGUF path; ``extra_env``: settings
    as ``ALLINONE_*`` variables; ``args``: more ``serve`` flags; ``log_path``: where its output
    goes (default: a temporary file, removed by ``stop``); ``small``: 2 threads and 1,024 tokens
    a sequence unless ``extra_env`` says otherwise (the tests' and benchmarks' size)."""

    def __init__(
        self,
        model: str,
        extra_env: dict[str, str] | None = None,
        args: tuple[str, ...] | list[str] = (),
        log_path: Path | None = None,
        small: bool = True,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        size = {"ALLINONE_THREADS": "2", "ALLINONE_CTX_PER_SEQ": "1024"} if small else {}
        env = {**os.environ, **size, "ALLINONE_MODEL": model, **(extra_env or {})}
        # A file, not a pipe: an unread pipe fills up and blocks the server's logging.
        self.log: IO[str]
        if log_path is None:
            self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed in stop()
                "w+", prefix="allinone-server-", suffix=".log"
            )
        else:
            self.log = open(log_path, "w+")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "allinone", "serve", "--port", str(self.port), *args],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            text=True,
        )

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self.proc.pid

    def output(self) -> str:
        """Everything the server printed so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until the model is loaded. RuntimeError (with the server's output) if it
        exits first; TimeoutError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                # /health says when the model is loaded, even if /ready refuses (memory limit).
                if httpx.get(f"{self.url}/health", timeout=2).json().get("ready"):
                    return
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        raise TimeoutError(f"server did not become ready in {timeout:g} s")

    @classmethod
    @contextlib.contextmanager
    def running(cls, model: str, extra_env: dict[str, str] | None = None, **kw: Any):
        """A ready server for the ``with`` block, stopped after it."""
        srv = cls(model, extra_env, **kw)
        try:
            srv.wait_ready()
            yield srv
        finally:
            srv.stop()

    def stop(self) -> str:
        """SIGTERM (a drain), SIGKILL after 30 s; returns the server's output."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        out = self.output()
        self.log.close()
        return out
