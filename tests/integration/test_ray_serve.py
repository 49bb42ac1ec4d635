"""Replicas on Ray Serve, for real: a Ray cluster (a head and three worker nodes, each its own
raylet) with this server's Serve application, two engine replicas of the tiny model, real HTTP.

The whole Ray part runs in a child process (tests/integration/ray_scenario.py) inside a network
namespace this module creates with only loopback in it, so every Ray address is 127.0.0.1 of
that namespace and no traffic reaches the machine's network. Afterwards no process is left in
the namespace, and the namespace is deleted. The last test does the same with the default model
(tests/integration/ray_default_scenario.py: one replica, what a user of the openai SDK sees).
``make test-ray`` installs Ray and runs these.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="ray[serve] is not installed: `make test-ray` installs it")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

SCENARIO = Path(__file__).with_name("ray_scenario.py")
DEFAULT_SCENARIO = Path(__file__).with_name("ray_default_scenario.py")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _netns_pids(ns: str) -> list[int]:
    out = _ip("netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split()]


def _run_in_namespace(script: Path, args: dict, work: Path, timeout: float) -> dict:
    """Run ``script`` (a scenario: writes its result to ``args["out"]``) in a fresh
    loopback-only namespace; clean up; return what it saw and what was left behind."""
    if shutil.which("ip") is None or os.geteuid() != 0:
        pytest.skip("needs root and iproute2's `ip` to create a network namespace")
    ns = f"aio-ray-{os.getpid()}"
    out, log = work / "result.json", work / "scenario.log"
    _ip("netns", "add", ns)
    try:
        _ip("-n", ns, "link", "set", "lo", "up")
        links = _ip("-n", ns, "-o", "link", "show").stdout.split("\n")
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        with log.open("w") as f:
            proc = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, str(script), json.dumps(args)],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=env,
                timeout=timeout,
            )
        left = _netns_pids(ns)
    finally:
        # Every process in this namespace was started by this test (the scenario and Ray's
        # processes under it): end whatever is still there, by its id.
        for pid in _netns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
    result = json.loads(out.read_text()) if out.exists() else {"error": "no result file"}
    result["returncode"] = proc.returncode
    result["links"] = [line for line in links if line.strip()]
    result["left_pids"] = left
    result["netns_left"] = ns in _ip("netns", "list").stdout.split()
    result["log"] = str(log)
    return result


@pytest.fixture(scope="module")
def scenario(tiny_model_path, tmp_path_factory) -> dict:
    """Run the scenario once in a fresh loopback-only namespace; clean up; return what it saw
    and what was left behind."""
    work = tmp_path_factory.mktemp("ray")
    args = {"model": str(tiny_model_path), "out": str(work / "result.json")}
    return _run_in_namespace(SCENARIO, args, work, timeout=840)


def _ok(scenario: dict) -> None:
    assert "error" not in scenario, scenario["error"] + f"\n(log: {scenario['log']})"


def test_only_loopback_in_the_namespace(scenario):
    assert len(scenario["links"]) == 1 and ": lo:" in scenario["links"][0], scenario["links"]


def test_requests_spread_over_replicas(scenario):
    _ok(scenario)
    replicas = Counter(rep for rep, _node in scenario["spread"])
    assert len(replicas) == 2, replicas
    nodes = {node for _rep, node in scenario["spread"]}
    assert len(nodes) == 2, "the two replicas run on two different Ray nodes"


def test_a_tasks_requests_stay_on_one_replica_and_hit_its_prefix_cache(scenario):
    _ok(scenario)
    a = scenario["affinity"]
    assert len(set(a["task_replicas"])) == 1, a["task_replicas"]
    home = a["task_replicas"][0]
    hits = a["prefix_hits_after"][home] - a["prefix_hits_before"][home]
    misses = a["prefix_misses_after"][home] - a["prefix_misses_before"][home]
    # the task's prefix is evaluated at most once, every later request reuses it
    assert misses <= 1 and hits >= len(a["task_replicas"]) - 1, (hits, misses)
    others = [r for r in a["prefix_hits_before"] if r != home]
    for r in others:
        assert a["prefix_hits_after"][r] == a["prefix_hits_before"][r]
        assert a["prefix_misses_after"][r] == a["prefix_misses_before"][r]
    assert a["routed"].get("away", 0) == 0, a["routed"]


def test_a_conversation_stays_on_one_replica(scenario):
    _ok(scenario)
    turns = scenario["affinity"]["conversation_replicas"]
    assert len(turns) == 3 and len(set(turns)) == 1, turns


def test_every_replicas_metrics_are_gathered_with_a_replica_label(scenario):
    _ok(scenario)
    up = scenario["affinity"]["replica_up"]
    engines = {r: v for r, v in up.items() if not r.startswith("front-")}
    assert len(engines) == 2 and all(v == 1.0 for v in engines.values()), up
    assert set(scenario["memory"]["rss"]) == set(engines)


def test_replica_memory_matches_the_plan(scenario):
    _ok(scenario)
    predicted = scenario["memory"]["predicted"]["after_load"]
    for replica, rss in scenario["memory"]["rss"].items():
        assert abs(rss - predicted) <= 0.15 * predicted, (replica, rss, predicted)


def test_a_killed_node_loses_no_request_a_client_retries_once(scenario):
    _ok(scenario)
    f = scenario["failover"]
    assert f["requests"] > 0 and f["failed"] == [], f["failed"]
    assert f["first_ok_after_kill_s"] is not None


def test_the_lost_replica_comes_back_and_serves(scenario):
    _ok(scenario)
    f = scenario["failover"]
    assert f["victim_replica"] not in f["replicas_after"]
    assert len(f["replicas_after"]) == 2, f["replicas_after"]
    assert f["status_after"].get("RUNNING") == 2, f["status_after"]
    assert f["replacement_serves_s"] is not None, "no request reached the new replica"


def test_nothing_is_left_behind(scenario):
    assert scenario["returncode"] == 0, scenario["log"]
    assert scenario["left_pids"] == [], "processes left in the test's namespace"
    assert not scenario["netns_left"]
    assert "shutdown_errors" not in scenario, scenario.get("shutdown_errors")


def test_the_default_model_behaves_through_the_ray_front(default_model_path, tmp_path_factory):
    """The default model as one engine replica on one worker node: what a user of the openai SDK
    sees through the Ray front (sentiment labels, a chat answer, a stream), every response
    naming its replica; then nothing left behind. Runs on its own cluster, after the tiny
    model's scenario is over."""
    work = tmp_path_factory.mktemp("ray-default")
    args = {"model": str(default_model_path), "out": str(work / "result.json")}
    res = _run_in_namespace(DEFAULT_SCENARIO, args, work, timeout=600)
    assert len(res["links"]) == 1 and ": lo:" in res["links"][0], res["links"]
    _ok(res)
    assert {"chat", "sentiment", "sentiment-en"} <= set(res["models"]), res["models"]
    for c in res["classify"]:
        assert c["status"] == 200 and c["label"] == c["expected"], c
    chat = res["chat"]
    assert "1" in chat["text"] and "3" in chat["text"], chat
    assert chat["finish_reason"] in ("stop", "length") and chat["completion_tokens"] > 0, chat
    stream = res["stream"]
    assert stream["chunks"] > 1 and "1" in stream["text"] and "3" in stream["text"], stream
    assert stream["finish_reason"] in ("stop", "length"), stream
    replicas = [c["replica"] for c in res["classify"]] + [chat["replica"], stream["replica"]]
    assert all(replicas) and len(set(replicas)) == 1, replicas  # one replica, named each time
    assert res["returncode"] == 0, res["log"]
    assert res["left_pids"] == [], "processes left in the test's namespace"
    assert not res["netns_left"]
    assert "shutdown_errors" not in res, res.get("shutdown_errors")
