"""The Ray Serve scenario that tests/integration/test_ray_serve.py runs in a child process inside
a loopback-only network namespace it created (``ip netns exec``): a Ray cluster of a head and
three worker nodes (``ray.cluster_utils.Cluster``), this server's Serve application with two
engine replicas of the tiny model, then traffic: spread, affinity, memory, a node killed under
traffic. Writes what it saw as JSON (``out``); the tests assert on it. Also a benchmark: the
figures in docs/scale-out.md come from its output.

Usage: python ray_scenario.py '{"model": PATH, "out": FILE}'
"""

from __future__ import annotations

import json
import sys
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import ray
from prometheus_client.parser import text_string_to_metric_families
from ray import serve
from ray.cluster_utils import Cluster

from allinone.planner.plan import PlanRequest, make_plan
from allinone.scaleout.ray_config import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    NODE_HEADER,
    REPLICA_HEADER,
    RayServeOptions,
)
from allinone.scaleout.ray_serve import deploy, engine_replica_ids

PORT = 8000
URL = f"http://127.0.0.1:{PORT}"
# Bounds on the traffic: the failover phase sends at most this many requests.
FAILOVER_MAX_REQUESTS = 400
FAILOVER_WAIT_S = 180


# What both scenarios' deployments share: one network namespace, so one proxy on the port.
SERVE_OPTIONS = {
    "host": "127.0.0.1",
    "port": PORT,
    "proxy_location": "HeadOnly",
    "front_resources": {"allinone_front": 0.01},
    "graceful_shutdown_timeout_s": 5.0,
}


def log(*a) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


@contextmanager
def cluster_run(out: Path, res: dict, worker_cpus: list[int]) -> Iterator[tuple[Cluster, list]]:
    """A head (0 CPUs, the front's resource) and one worker node per entry of ``worker_cpus``,
    connected; on the way out, a traceback of any failure in ``res["error"]``, Serve, Ray and
    the cluster shut down (their errors in ``res["shutdown_errors"]``), timings, and ``res``
    written to ``out`` as JSON for the test."""
    t0 = time.monotonic()
    res.setdefault("timings", {})
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "object_store_memory": 80 << 20,
            "resources": {"allinone_front": 1},
        },
    )
    try:
        workers = [cluster.add_node(num_cpus=c, object_store_memory=80 << 20) for c in worker_cpus]
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        res["timings"]["cluster_up_s"] = time.monotonic() - t0
        log("cluster up")
        yield cluster, workers
    except Exception:
        res["error"] = traceback.format_exc()
        log(res["error"])
    finally:
        t_down = time.monotonic()
        for step in (serve.shutdown, ray.shutdown, cluster.shutdown):
            try:
                step()
            except Exception:
                res.setdefault("shutdown_errors", []).append(traceback.format_exc())
        res["timings"]["shutdown_s"] = time.monotonic() - t_down
        res["timings"]["total_s"] = time.monotonic() - t0
        out.write_text(json.dumps(res, indent=1, ensure_ascii=False, default=str))


def metrics(client: httpx.Client) -> dict[tuple[str, str], float]:
    """(sample name, replica) -> value, from the front's gathered /metrics."""
    r = client.get(f"{URL}/metrics", timeout=30)
    r.raise_for_status()
    out: dict[tuple[str, str], float] = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            replica = s.labels.get("replica", "")
            if s.name.startswith("allinone_ray_routed"):
                replica = s.labels.get("decision", "")
            key = (s.name, replica)
            if len(s.labels) <= 2:  # no per-route breakdowns
                out[key] = out.get(key, 0.0) + s.value
    return out


def by_replica(m: dict[tuple[str, str], float], name: str) -> dict[str, float]:
    return {rep: v for (n, rep), v in m.items() if n == name}


def chat_body(first: str, turns: int = 1) -> dict:
    messages = [{"role": "user", "content": first}]
    for i in range(1, turns):
        messages += [
            {"role": "assistant", "content": f"noted {i}"},
            {"role": "user", "content": f"and then {i}"},
        ]
    return {"model": "chat", "messages": messages, "max_tokens": 4}


def engine_status() -> dict:
    app = serve.status().applications.get(APP_NAME)
    if app is None:
        return {}
    dep = app.deployments.get(ENGINE_DEPLOYMENT)
    return {str(k): v for k, v in (dep.replica_states if dep else {}).items()}


def phase_spread(client: httpx.Client, res: dict) -> None:
    seen = []
    for i in range(20):
        r = client.post(
            f"{URL}/v1/chat/completions", json=chat_body(f"conversation {i}: hello"), timeout=120
        )
        r.raise_for_status()
        seen.append([r.headers[REPLICA_HEADER], r.headers[NODE_HEADER]])
    res["spread"] = seen


def phase_affinity(client: httpx.Client, res: dict) -> None:
    before = metrics(client)
    task_replicas = []
    for i in range(8):
        r = client.post(
            f"{URL}/v1/classify",
            json={"task": "sentiment", "input": f"review number {i}: the room was clean"},
            timeout=120,
        )
        r.raise_for_status()
        task_replicas.append(r.headers[REPLICA_HEADER])
    after = metrics(client)
    conv_replicas = []
    for turns in (1, 2, 3):
        r = client.post(
            f"{URL}/v1/chat/completions",
            json=chat_body("a long conversation about hotels", turns),
            timeout=120,
        )
        r.raise_for_status()
        conv_replicas.append(r.headers[REPLICA_HEADER])
    final = metrics(client)
    res["affinity"] = {
        "task_replicas": task_replicas,
        "conversation_replicas": conv_replicas,
        "prefix_hits_before": by_replica(before, "allinone_engine_prefix_hits_total"),
        "prefix_hits_after": by_replica(after, "allinone_engine_prefix_hits_total"),
        "prefix_misses_before": by_replica(before, "allinone_engine_prefix_misses_total"),
        "prefix_misses_after": by_replica(after, "allinone_engine_prefix_misses_total"),
        "routed": by_replica(final, "allinone_ray_routed_total"),
        "replica_up": by_replica(final, "allinone_replica_up"),
    }


def phase_memory(client: httpx.Client, res: dict, plan: dict) -> None:
    time.sleep(2.5)  # the memory sampler's period is 1 s here
    m = metrics(client)
    res["memory"] = {
        "rss": by_replica(m, "allinone_memory_rss_bytes"),
        "replica_up": by_replica(m, "allinone_replica_up"),
        "predicted": RayServeOptions.predicted_rss(plan),
    }


def phase_failover(client: httpx.Client, res: dict, cluster: Cluster, workers: list) -> None:
    """Traffic from two client threads (the openai SDK, one retry) while a node with a replica
    is killed; until the replacement replica serves."""
    before = set(engine_replica_ids(APP_NAME))
    node_of = {}
    for rep, node in res["spread"]:
        node_of[rep] = node
    victim_replica = sorted(before)[0]
    victim_node = next(w for w in workers if w.node_id == node_of[victim_replica])
    retried = []
    outcomes: list[dict] = []
    stop = threading.Event()
    lock = threading.Lock()
    sent = [0]

    def on_response(response: httpx.Response) -> None:
        if response.status_code >= 500:
            retried.append((time.monotonic(), response.status_code))

    def traffic(worker: int) -> None:
        http = openai.DefaultHttpxClient(event_hooks={"response": [on_response]})
        oc = openai.OpenAI(
            base_url=f"{URL}/v1", api_key="x", max_retries=1, timeout=120, http_client=http
        )
        i = 0
        while not stop.is_set():
            with lock:
                if sent[0] >= FAILOVER_MAX_REQUESTS:
                    return
                sent[0] += 1
            i += 1
            t = time.monotonic()
            try:
                raw = oc.chat.completions.with_raw_response.create(
                    model="chat",
                    messages=[{"role": "user", "content": f"client {worker} request {i}"}],
                    max_tokens=2,
                )
                raw.parse()
                outcomes.append({"t": t, "ok": True, "replica": raw.headers.get(REPLICA_HEADER)})
            except Exception as exc:
                outcomes.append({"t": t, "ok": False, "error": f"{type(exc).__name__}: {exc}"})
            time.sleep(0.1)

    threads = [threading.Thread(target=traffic, args=(w,), daemon=True) for w in range(2)]
    for th in threads:
        th.start()
    time.sleep(3)
    log("killing node", victim_node.node_id, "with replica", victim_replica)
    t_kill = time.monotonic()
    cluster.remove_node(victim_node, allow_graceful=False)
    t_replaced = t_new_serves = None
    while time.monotonic() - t_kill < FAILOVER_WAIT_S:
        now = set(engine_replica_ids(APP_NAME))
        new = now - before
        if t_replaced is None and new and engine_status().get("RUNNING") == 2:
            t_replaced = time.monotonic()
            log("replacement running:", new)
        served_new = [o for o in outcomes if o.get("replica") in new and o["t"] > t_kill]
        if served_new and t_new_serves is None:
            t_new_serves = min(o["t"] for o in served_new)
        if t_replaced and t_new_serves:
            break
        time.sleep(0.25)
    time.sleep(1)
    stop.set()
    for th in threads:
        th.join(timeout=150)
    after_kill = [o for o in outcomes if o["t"] > t_kill]
    first_ok_after = min((o["t"] for o in after_kill if o["ok"]), default=None)
    res["failover"] = {
        "victim_replica": victim_replica,
        "replicas_before": sorted(before),
        "replicas_after": engine_replica_ids(APP_NAME),
        "requests": len(outcomes),
        "failed": [o for o in outcomes if not o["ok"]],
        "retried_5xx": len(retried),
        "first_ok_after_kill_s": None if first_ok_after is None else first_ok_after - t_kill,
        "replacement_running_s": None if t_replaced is None else t_replaced - t_kill,
        "replacement_serves_s": None if t_new_serves is None else t_new_serves - t_kill,
        "status_after": engine_status(),
    }


def main() -> int:
    args = json.loads(sys.argv[1])
    res: dict = {"timings": {}}
    with cluster_run(Path(args["out"]), res, [1, 1, 1]) as (cluster, workers):
        plan = make_plan(PlanRequest(model=args["model"], context=512, concurrency=2, threads=1))
        options = RayServeOptions.from_plan(
            plan,
            min_replicas=2,
            max_replicas=2,
            health_check_period_s=1.0,
            health_check_timeout_s=10.0,
            env_extra={
                "ALLINONE_MODEL_ID": "m",
                "ALLINONE_GRAMMAR_PREWARM": "false",
                "ALLINONE_MEMORY_SAMPLE_S": "1",
            },
            **SERVE_OPTIONS,
        )
        res["options"] = {
            "num_cpus": options.num_cpus,
            "memory_bytes": options.memory_bytes,
            "env": options.env,
        }
        t1 = time.monotonic()
        deploy(options)
        res["timings"]["deploy_s"] = time.monotonic() - t1
        log("application running")
        with httpx.Client() as client:
            phase_spread(client, res)
            log("spread done")
            phase_affinity(client, res)
            log("affinity done")
            phase_memory(client, res, plan)
            log("memory done")
            if "failover" in args.get("phases", ["failover"]):
                phase_failover(client, res, cluster, workers)
                log("failover done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
