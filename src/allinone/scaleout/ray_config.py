"""A Ray Serve deployment of this server, without importing Ray: what each replica asks for (from
the planner), the Serve config file ``allinone deploy ray`` renders, the affinity key the request
router hashes, and the gathering of every replica's Prometheus metrics under a replica label.

The deployments themselves (``ray_serve.py``): ``AllinoneFront``, the HTTP ingress, reads each
request's body once to find its task and conversation, and hands the request to
``AllinoneEngine``, whose replicas each hold one llama.cpp engine and this project's FastAPI app;
the front's handle routes with ``AffinityRouter`` (home replica by rendezvous hashing of the key,
the least loaded one when home is busy).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from allinone import __version__

APP_NAME = "allinone"
ENGINE_DEPLOYMENT = "AllinoneEngine"
FRONT_DEPLOYMENT = "AllinoneFront"
IMPORT_PATH = "allinone.scaleout.ray_serve:app_builder"
ROUTER_CLASS = "allinone.scaleout.ray_serve.AffinityRouter"
# Response headers naming the replica (and its Ray node) that served a request.
REPLICA_HEADER = "x-allinone-replica"
NODE_HEADER = "x-allinone-node"
# A client may name its own affinity key (Serve's session-id header); else it comes from the body.
SESSION_HEADER = "x-session-id"
MiB = 2**20

# A replica is a Ray worker process: Ray's core worker, its gRPC threads and Serve's replica
# machinery come on top of the plain server the planner models. Measured 2026-12-06 on this
# machine kind (ray 2.60.0, python 3.11): an engine replica's RSS after load minus the plan's
# after_load for the same settings (tiny model, 512 x 2): 427 MiB - 346 MiB = 81 MiB.
RAY_REPLICA_OVERHEAD_BYTES = 81 * MiB


@dataclass
class RayServeOptions:
    """Everything the Serve application asks for. ``from_plan`` fills the per-replica figures
    from a CPU plan; the rest are Serve's own knobs."""

    env: dict[str, str] = field(default_factory=dict)
    num_cpus: float = 2.0
    memory_bytes: int = 0
    min_replicas: int = 1
    max_replicas: int = 2
    initial_replicas: int | None = None
    # Autoscaling target: requests in flight per replica (the engine's sequences).
    target_ongoing_requests: float = 4.0
    # Serve stops sending to a replica with this many requests in flight (engine queue beyond).
    max_ongoing_requests: int = 16
    # The router leaves a key's home replica for the least loaded one from this many in flight.
    busy_threshold: int = 4
    engine_resources: dict[str, float] = field(default_factory=dict)
    front_replicas: int = 1
    front_resources: dict[str, float] = field(default_factory=dict)
    max_replicas_per_node: int | None = 1
    health_check_period_s: float = 5.0
    health_check_timeout_s: float = 10.0
    graceful_shutdown_timeout_s: float = 30.0
    route_prefix: str = "/"
    name: str = APP_NAME
    host: str = "0.0.0.0"
    port: int = 8000
    # Serve's HTTP proxies: one on every node (behind a load balancer), or the head's only.
    proxy_location: str = "EveryNode"

    @staticmethod
    def predicted_rss(plan: Mapping[str, Any]) -> dict[str, int]:
        """A replica's resident memory the plan predicts (after load, after filling every
        sequence), the Ray worker's own included."""
        return {k: int(v) + RAY_REPLICA_OVERHEAD_BYTES for k, v in plan["predicted_rss"].items()}

    @classmethod
    def from_plan(cls, plan: Mapping[str, Any], **over: Any) -> RayServeOptions:
        """Per replica: the plan's CPUs and memory limit, its server settings as ``ALLINONE_*``
        variables; the router's busy threshold and the autoscaling target are the engine's
        sequences, Serve's cap twice that plus the queue the engine keeps."""
        if plan.get("engine") != "llama_cpp":
            raise ValueError("a Ray Serve deployment runs this project's CPU engine: plan for cpu")
        server = plan["server"]
        parallel = int(server["parallel"])
        overhead_mb = RAY_REPLICA_OVERHEAD_BYTES // MiB
        env = {
            "ALLINONE_MODEL": str(plan.get("model_ref", "default")),
            "ALLINONE_PARALLEL": str(parallel),
            "ALLINONE_CTX_PER_SEQ": str(server["ctx_per_seq"]),
            "ALLINONE_THREADS": str(server["threads"]),
            # A replica is a Ray worker: its own runtime comes on top of the plan's process.
            "ALLINONE_MEMORY_SOFT_LIMIT_MB": str(server["memory_soft_limit_mb"] + overhead_mb),
            "ALLINONE_MEMORY_HARD_LIMIT_MB": str(server["memory_hard_limit_mb"] + overhead_mb),
            # Serve replaces a replica whose health check fails; the process must not exit
            # by itself first (that would look like a crash, not an unhealthy replica).
            "ALLINONE_EXIT_ON_FATAL": "false",
        }
        base: dict[str, Any] = {
            "env": env,
            "num_cpus": float(plan["host"]["cpus"]),
            "memory_bytes": int(plan["host"]["memory_limit_bytes"]) + RAY_REPLICA_OVERHEAD_BYTES,
            "target_ongoing_requests": float(parallel),
            "max_ongoing_requests": 4 * parallel,
            "busy_threshold": parallel,
        }
        base.update(over)
        env_over = base.pop("env_extra", None) or {}
        base["env"] = {**base["env"], **env_over}
        return cls(**base)

    def engine_options(self) -> dict[str, Any]:
        """``serve.deployment(...)`` options of the engine deployment (also the config file's)."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.memory_bytes:
            actor["memory"] = self.memory_bytes
        if self.engine_resources:
            actor["resources"] = dict(self.engine_resources)
        autoscaling: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        if self.initial_replicas is not None:
            autoscaling["initial_replicas"] = self.initial_replicas
        opts: dict[str, Any] = {
            "ray_actor_options": actor,
            "autoscaling_config": autoscaling,
            "max_ongoing_requests": self.max_ongoing_requests,
            "health_check_period_s": self.health_check_period_s,
            "health_check_timeout_s": self.health_check_timeout_s,
            "graceful_shutdown_timeout_s": self.graceful_shutdown_timeout_s,
            "request_router_config": {
                "request_router_class": ROUTER_CLASS,
                "request_router_kwargs": {"busy_threshold": self.busy_threshold},
            },
        }
        if self.max_replicas_per_node:
            opts["max_replicas_per_node"] = self.max_replicas_per_node
        return opts

    def front_options(self) -> dict[str, Any]:
        """The ingress: no CPU of its own (it only relays), ``front_replicas`` of it."""
        actor: dict[str, Any] = {"num_cpus": 0}
        if self.front_resources:
            actor["resources"] = dict(self.front_resources)
        return {
            "num_replicas": self.front_replicas,
            "ray_actor_options": actor,
            "max_ongoing_requests": 1000,
        }

    def to_args(self) -> dict[str, Any]:
        """The application builder's arguments (``app_builder``; the config file's ``args``)."""
        return {
            "env": dict(self.env),
            "busy_threshold": self.busy_threshold,
            "engine": self.engine_options(),
            "front": self.front_options(),
        }


def render_serve_config(
    options: RayServeOptions, plan: Mapping[str, Any] | None = None
) -> dict[str, str]:
    """``serve.yaml`` for ``serve run serve.yaml`` / ``serve deploy serve.yaml``: the application
    (import path and builder arguments) and its deployments' options, all from the plan."""
    import yaml

    config = {
        "proxy_location": options.proxy_location,
        "http_options": {"host": options.host, "port": options.port},
        "applications": [
            {
                "name": options.name,
                "route_prefix": options.route_prefix,
                "import_path": IMPORT_PATH,
                "args": options.to_args(),
            }
        ],
    }
    header = [f"# Rendered by allinone {__version__}: a Ray Serve application of this server."]
    if plan is not None:
        header.append(
            f"# From a plan: {plan['model']} ({plan['dtype']}), context {plan['context']} x "
            f"{plan['concurrency']} sequences; per replica {options.num_cpus:g} CPUs, "
            f"memory {options.memory_bytes // MiB} MiB."
        )
    header += [
        "# Run: serve run serve.yaml (a local cluster) or serve deploy serve.yaml",
        "# (a running cluster's dashboard). Every node needs this package and the model.",
    ]
    text = yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    return {"serve.yaml": "\n".join(header) + "\n" + text}


# -- affinity -----------------------------------------------------------------------------------

# What identifies a conversation: its system text and first user turn, or a completion's start.
_SYSTEM_ROLES = ("system", "developer")
_PROMPT_CHARS = 512


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "".join(_text(v) for v in value)
    if isinstance(value, dict):
        for k in ("text", "content", "input_text"):
            if k in value:
                return _text(value[k])
    return ""


def affinity_key(path: str, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()) -> str | None:
    """The key whose home replica holds this request's cached prefix, or None (no affinity: the
    least loaded replica). A client's ``x-session-id`` header wins; else from the JSON body:

    - a task (``task``, or ``model`` naming a task or the model): requests of one task share
      its cached prefix;
    - plus the conversation (its system text and first turns, or a completion's first 512
      characters): a conversation's next turn finds its earlier turns in that replica's cache.
    """
    for k, v in headers:
        if k.lower() == SESSION_HEADER.encode():
            return "session:" + v.decode("latin-1")
    if not body or not path.startswith("/v1/"):
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    task = data.get("task") or data.get("model")
    if not isinstance(task, str):
        task = ""
    parts: list[str] = []
    if isinstance(data.get("system"), str | list):
        parts.append(_text(data["system"]))
    if isinstance(data.get("instructions"), str):
        parts.append(data["instructions"])
    turns = data.get("messages")
    if turns is None and isinstance(data.get("input"), list) and "task" not in data:
        turns = data["input"]  # /v1/responses
    if isinstance(turns, list):
        # The conversation's system text and its first user turn: later turns only add to it.
        system = [m for m in turns if isinstance(m, dict) and m.get("role") in _SYSTEM_ROLES]
        first = next((m for m in turns if m not in system), None)
        parts += [_text(m) for m in system] + ([_text(first)] if first is not None else [])
    elif isinstance(data.get("prompt"), str):
        parts.append(data["prompt"][:_PROMPT_CHARS])
    if not task and not parts:
        return None
    if not parts:
        return "task:" + task
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).hexdigest()
    return f"conv:{task}:{digest}"


def rendezvous_order(key: str, replica_ids: Iterable[str]) -> list[str]:
    """Replica ids, best home first, by rendezvous (highest random weight) hashing: every router
    ranks the same way without sharing state, and a replica that leaves moves only its own keys."""

    def weight(rid: str) -> bytes:
        return hashlib.blake2b(f"{key}\x1f{rid}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


# -- metrics ------------------------------------------------------------------------------------


def gather_metrics(texts: Mapping[str, str | None]) -> bytes:
    """One Prometheus exposition of every replica's ``/metrics`` (replica id -> text), each
    sample with a ``replica`` label, each family once; ``allinone_replica_up`` says which replicas
    answered (None: did not)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import GaugeMetricFamily, Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    up = GaugeMetricFamily(
        "allinone_replica_up", "1 when the replica answered this scrape", labels=["replica"]
    )
    for replica, text in sorted(texts.items()):
        up.add_metric([replica], 0.0 if text is None else 1.0)
        if text is None:
            continue
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type)
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp)

    class _Gathered:
        def collect(self):
            yield up
            yield from families.values()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Gathered())  # type: ignore[arg-type]
    return generate_latest(registry)
