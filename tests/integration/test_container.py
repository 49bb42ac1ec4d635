"""The server's image run under container limits (podman + runc, cgroup v1 or v2).

The image is the one `make image` builds (`allinone deploy image`); the model is mounted from the
cache. Every container publishes its port on 127.0.0.1 only (through slirp4netns: no iptables
rules), traffic is bounded, and every container, pod and volume a test creates is removed when it
ends (by name; nothing else is touched).
Skipped, with the reason, where podman is not installed or the image is not built, unless
ALLINONE_REQUIRE_CONTAINER=1 (set by `make test-container`) turns that into a failure.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from allinone import __version__
from allinone.server_process import free_port

pytestmark = pytest.mark.container

IMAGE = os.environ.get("ALLINONE_TEST_IMAGE", f"localhost/allinone:{__version__}")
PREFIX = f"allinone-test-{os.getpid()}"
_names = itertools.count()


def _podman(*args: str, check: bool = True):
    from allinone.container.image import podman

    return podman(*args, check=check)


def _unavailable(reason: str):
    if os.environ.get("ALLINONE_REQUIRE_CONTAINER") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def image() -> str:
    if shutil.which("podman") is None:
        _unavailable("podman is not installed (`make test-container` installs it)")
    if _podman("image", "exists", IMAGE, check=False).returncode != 0:
        _unavailable(f"image {IMAGE} is not built (`make image` builds it)")
    return IMAGE


@pytest.fixture(scope="module")
def checks_volume(image):
    """A volume for the start-up host check's marker, so only the first container runs it."""
    name = f"{PREFIX}-checks"
    _podman("volume", "create", name)
    yield name
    _podman("volume", "rm", "-f", name, check=False)


class Container:
    """One `podman run -d` of the image, reachable on a loopback port."""

    def __init__(self, name: str, port: int) -> None:
        self.name, self.port = name, port
        self.url = f"http://127.0.0.1:{port}"

    def inspect(self) -> dict:
        return json.loads(_podman("inspect", self.name).stdout)[0]

    def logs(self) -> str:
        res = _podman("logs", self.name, check=False)
        return (res.stdout + res.stderr)[-4000:]

    def wait_ready(self, timeout: float = 300) -> dict:
        """/ready's body once it answers 200; fails with the log if the container stops."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not self.inspect()["State"]["Running"]:
                pytest.fail(f"container {self.name} stopped while starting:\n{self.logs()}")
            try:
                r = httpx.get(f"{self.url}/ready", timeout=5)
                if r.status_code == 200:
                    return r.json()
                if r.status_code == 503 and "memory_pressure" in r.text:
                    pytest.fail(f"{self.name} is over its memory soft limit before any work")
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        pytest.fail(f"container {self.name} not ready in {timeout:.0f} s:\n{self.logs()}")

    def cgroup_file(self, v1: str, v2: str) -> str | None:
        """A file of the container's memory cgroup, read from the host (None if absent)."""
        path = self.inspect()["State"].get("CgroupPath", "")
        for p in (
            Path("/sys/fs/cgroup/memory") / path.lstrip("/") / v1,
            Path("/sys/fs/cgroup") / path.lstrip("/") / v2,
        ):
            if p.is_file():
                return p.read_text()
        return None


@contextmanager
def container(image: str, models: Path, volume: str, limits: list[str], env: dict[str, str]):
    name = f"{PREFIX}-{next(_names)}"
    port = free_port()
    # slirp4netns: the published port is forwarded in user space, so the host's firewall is
    # left as it was (podman's default bridge has netavark add iptables chains it never removes)
    args = ["run", "-d", "--name", name, "--network", "slirp4netns"]
    args += ["-p", f"127.0.0.1:{port}:8000", *limits]
    args += ["-v", f"{models}:/models/models:ro", "-v", f"{volume}:/models/host-checks"]
    for k, v in env.items():
        args += ["-e", f"{k}={v}"]
    _podman(*args, image)
    try:
        yield Container(name, port)
    finally:
        _podman("rm", "-f", "-t", "5", name, check=False)


TINY = {"ALLINONE_MODEL": "tiny", "ALLINONE_PARALLEL": "2", "ALLINONE_CTX_PER_SEQ": "1024"}


@pytest.mark.parametrize("cpus", [1, 2])
def test_threads_and_memory_budget_follow_the_container_limits(
    image, tiny_model_path, checks_volume, cpus
):
    limits = ["--cpus", str(cpus), "--memory", "1g", "--memory-swap", "1g"]
    with container(image, tiny_model_path.parent, checks_volume, limits, TINY) as c:
        ready = c.wait_ready()
        threads = ready["threads"]
        # the CFS quota caps the count; at 2 CPUs the affinity mask may be the smaller one
        assert threads["count"] == min(cpus, len(os.sched_getaffinity(0))), threads
        if cpus == 1:
            assert "quota 100000/100000 us" in threads["default"]["source"], threads
        memory = ready["memory"]
        assert memory["cgroup_limit_mb"] == 1024, memory
        assert memory["soft_limit_mb"] == 819 and memory["hard_limit_mb"] == 921, memory
        assert "memory" in memory["source"] and "1024 MiB" in memory["source"], memory
        r = httpx.post(
            f"{c.url}/v1/classify",
            json={"task": "sentiment", "input": "房间干净，服务周到"},
            timeout=120,
        )
        assert r.status_code == 200 and r.json()["results"][0]["label"] in ("正面", "负面")
        assert '"event": "memory_budget"' in c.logs()


def _chat(i: int) -> dict:
    """A distinct long chat: each finished one is kept in the prompt cache (~15 MB of KV cells
    on the tiny model), which is how this server's memory grows under traffic."""
    rng = random.Random(i)
    words = ["apple", "river", "stone", "cloud", "light", "music", "table", "window", "garden"]
    text = f"Note {i}: " + " ".join(rng.choice(words) for _ in range(500))
    return {
        "model": "smollm2-135m-instruct-q4_1",
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
    }


async def _push_until_shed(url: str, most: int, concurrency: int) -> list[tuple[int, str]]:
    """Send distinct chats, ``concurrency`` at a time, until one is refused for memory (then
    the ones in flight finish) or ``most`` were sent; (status, error code) of each."""
    results: list[tuple[int, str]] = []
    ids = iter(range(most))
    shed = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        for i in ids:
            if shed.is_set():
                return
            r = await client.post(f"{url}/v1/chat/completions", json=_chat(i), timeout=300)
            code = "" if r.status_code == 200 else r.json()["error"]["code"]
            results.append((r.status_code, code))
            if code == "memory_pressure":
                shed.set()

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def test_a_tight_memory_limit_sheds_load_with_503_instead_of_an_oom_kill(
    image, tiny_model_path, checks_volume
):
    # 560 MiB: the tiny model's server starts at about 365 MB RSS (parallel 2, 1,024 tokens a
    # sequence), under the derived soft limit (448 MiB); a prompt cache allowed 2 GiB would
    # grow past the container's limit. Without the derived budget
    # (ALLINONE_MEMORY_FROM_CGROUP=false) the same traffic ends in the kernel's OOM kill, exit
    # 137 (measured: docs/scale-out.md#container-image).
    limits = ["--cpus", "1", "--memory", "560m", "--memory-swap", "560m"]
    env = {**TINY, "ALLINONE_PROMPT_CACHE_MB": "2048", "ALLINONE_MEMORY_SAMPLE_S": "2"}
    with container(image, tiny_model_path.parent, checks_volume, limits, env) as c:
        ready = c.wait_ready()
        assert ready["memory"]["soft_limit_mb"] == 448, ready["memory"]
        results = asyncio.run(_push_until_shed(c.url, most=40, concurrency=2))
        codes = [code for _, code in results]
        assert codes.count("") >= 1, results  # it served before it shed
        assert "memory_pressure" in codes, f"never shed load: {results}\n{c.logs()}"
        assert {s for s, _ in results} <= {200, 503}, results
        # still running and answering: alive, not ready, new work refused with Retry-After
        state = c.inspect()["State"]
        assert state["Running"] and state["ExitCode"] == 0, state
        assert httpx.get(f"{c.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{c.url}/ready", timeout=10).status_code == 503
        r = httpx.post(f"{c.url}/v1/chat/completions", json=_chat(1000), timeout=60)
        assert r.status_code == 503 and r.json()["error"]["code"] == "memory_pressure"
        assert r.headers["retry-after"] == "1"
        # and the kernel never had to act: the cgroup's charge never reached its limit
        failcnt = c.cgroup_file("memory.failcnt", "memory.events")
        if failcnt is not None and "oom_kill" in failcnt:  # cgroup v2: memory.events
            assert "oom_kill 0" in failcnt and "\nmax 0" in "\n" + failcnt, failcnt
        elif failcnt is not None:
            assert int(failcnt) == 0, failcnt


def test_podman_kube_play_runs_the_rendered_deployment_and_it_serves(
    image, tiny_model_path, tmp_path
):
    import yaml

    from allinone.planner.deploy import DeployOptions, render
    from allinone.planner.plan import PlanRequest, make_plan

    plan = make_plan(PlanRequest(model=str(tiny_model_path), context=1024, concurrency=2))
    text = render("k8s", plan, DeployOptions(image=image))["allinone.k8s.yaml"]
    deployment = next(d for d in yaml.safe_load_all(text) if d["kind"] == "Deployment")
    # What the test changes, and only that: names of its own (the pod, the claim, which podman
    # maps to a named volume), one replica, and the port published on 127.0.0.1 (podman kube
    # play publishes a containerPort on 0.0.0.0 unless hostIP says otherwise; Kubernetes would
    # publish nothing).
    port = free_port()
    name, claim = f"{PREFIX}-k8s", f"{PREFIX}-models"
    deployment["metadata"]["name"] = name
    deployment["spec"]["replicas"] = 1
    pod = deployment["spec"]["template"]["spec"]
    pod["volumes"][0]["persistentVolumeClaim"]["claimName"] = claim
    pod["containers"][0]["ports"][0].update({"hostIP": "127.0.0.1", "hostPort": port})
    path = tmp_path / "deployment.yaml"
    path.write_text(yaml.safe_dump(deployment, sort_keys=False))
    cache = tiny_model_path.parent.parent  # mounted read-only at /models, as the claim would be
    # podman builds its pod infra ("pause") image the first time; removed again if this made it
    pause = _podman("images", "-q", "--filter", "reference=localhost/podman-pause").stdout.strip()
    _podman(
        "volume",
        "create",
        "--opt",
        "type=none",
        "--opt",
        "o=bind",
        "--opt",
        f"device={cache}",
        claim,
    )
    try:
        _podman("kube", "play", "--network", "slirp4netns", str(path))
        c = Container(f"{name}-pod-0-allinone", port)
        ready = c.wait_ready()
        host = c.inspect()["HostConfig"]
        # the plan's limits reached the container, and the server took the plan's budget
        assert host["Memory"] == plan["host"]["memory_limit_bytes"]
        assert host["CpuQuota"] == plan["host"]["cpus"] * host["CpuPeriod"]
        assert host["ReadonlyRootfs"] is True and c.inspect()["Config"]["User"] == "10001"
        assert ready["memory"]["soft_limit_mb"] == plan["server"]["memory_soft_limit_mb"]
        assert ready["memory"]["source"].startswith("settings")
        assert ready["threads"]["count"] == plan["server"]["threads"]
        r = httpx.post(
            f"{c.url}/v1/classify", json={"task": "sentiment", "input": "太差了"}, timeout=120
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{c.url}/health", timeout=10).json()["status"] == "ok"
    finally:
        _podman("kube", "down", str(path), check=False)
        _podman("volume", "rm", "-f", claim, check=False)
        if not pause:
            for made in _podman(
                "images", "-q", "--filter", "reference=localhost/podman-pause"
            ).stdout.split():
                _podman("rmi", made, check=False)
    assert _podman("pod", "exists", f"{name}-pod-0", check=False).returncode != 0
