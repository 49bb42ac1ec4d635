"""This server's replicas on Ray Serve (needs ``ray[serve]``: requirements-ray.txt).

Two deployments make one Serve application (``app_builder``):

- ``AllinoneEngine``: each replica holds one llama.cpp engine and this project's FastAPI app
  (``create_app``, its lifespan run by the replica), and serves whole HTTP requests handed to it
  (``ForwardedRequest``) as a stream of ASGI messages. Its health check is the app's ``/ready``:
  a replica whose engine died fails it and Serve replaces the replica. ``num_cpus`` and memory
  come from the planner (``ray_config.RayServeOptions.from_plan``), the replica count from
  Serve's autoscaler on requests in flight.
- ``AllinoneFront``: the HTTP ingress (an ASGI app, no engine): reads the body once, finds its
  affinity key (``ray_config.affinity_key``: the task, and the conversation), and forwards the
  request through a handle whose router is ``AffinityRouter``: the key's home replica (its
  prefix cache holds the task's prompt and the conversation's earlier turns), or the least
  loaded replica when home is busy. ``GET /metrics`` on the front gathers every engine replica's
  metrics with a ``replica`` label, and the router's own counters.

Serve's stock HTTP proxy cannot route by the body (it streams the body to the replica after
routing), hence the front: ``ray.serve.llm`` does the same with its OpenAI ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import ray
from prometheus_client import CollectorRegistry, Counter, generate_latest
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.config import RequestRouterConfig
from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from ray.serve.request_router import (
    PendingRequest,
    ReplicaID,
    RunningReplica,
)

from allinone.scaleout.ray_config import (
    APP_NAME,
    ENGINE_DEPLOYMENT,
    FRONT_DEPLOYMENT,
    NODE_HEADER,
    REPLICA_HEADER,
    RayServeOptions,
    affinity_key,
    gather_metrics,
    rendezvous_order,
)

log = logging.getLogger("allinone.ray")

# The front reads at most this much of a body before forwarding it; the engine's own body limits
# (ALLINONE_MAX_BODY_BYTES, the audio upload cap) answer 413 for anything larger.
FORWARD_BODY_LIMIT = 64 * 2**20
SCRAPE_TIMEOUT_S = 5.0


@dataclass
class ForwardedRequest:
    """One HTTP request, read whole by the front, for an engine replica to serve."""

    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    client: tuple[str, int] | None = None
    scheme: str = "http"
    http_version: str = "1.1"
    root_path: str = ""
    # The router's inputs: the home replica of ``affinity``; ``replica`` pins one replica (by
    # its unique id) for the metrics scrape.
    affinity: str | None = None
    replica: str | None = None

    def scope(self) -> dict[str, Any]:
        """The ASGI scope the engine's app sees."""
        return {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": self.http_version,
            "method": self.method,
            "scheme": self.scheme,
            "path": self.path,
            "raw_path": self.path.encode(),
            "root_path": self.root_path,
            "query_string": self.query_string,
            "headers": list(self.headers),
            "client": self.client,
            "server": None,
        }


# -- the request router (runs in the front's process, inside its handle) ------------------------

ROUTER_REGISTRY = CollectorRegistry(auto_describe=False)
ROUTED = Counter(
    "allinone_ray_routed",
    "Requests the front routed to engine replicas: home (the key's home replica), away (another "
    "replica: home was busy), unkeyed (no affinity key: least loaded), pinned (metrics scrapes)",
    ["decision"],
    registry=ROUTER_REGISTRY,
)


def _forwarded(pending: PendingRequest | None) -> ForwardedRequest | None:
    # By its fields, not isinstance: Serve rebuilds the router class from a cloudpickle, whose
    # module globals need not be the ones the front's requests were made with.
    for arg in pending.args if pending is not None else ():
        if hasattr(arg, "affinity") and hasattr(arg, "replica"):
            return arg
    return None


class AffinityRouter(ConsistentHashRouter):
    """Keeps a key's requests on one replica, the key's home by rendezvous hashing over the
    replicas' ids (every front ranks alike, and a replica that leaves moves only its own keys).
    When home has ``busy_threshold`` requests in flight or more (the engine's sequences, so a new
    one would wait in its queue), the request goes to the least loaded replica instead; Serve's
    own selection then picks the replica with the shortest queue among those that accept.

    Each chosen replica is the one chosen for that request (no first-in-first-out handover of
    replicas between waiting requests, which would undo the affinity). Serve's base routing
    loop can orphan such a request when several wait at once; ConsistentHashRouter (Serve's
    session-affinity router) carries the fix, so this router builds on it and replaces its
    choice."""

    def initialize_state(self, busy_threshold: int = 4, **_: Any) -> None:
        super().initialize_state()
        self._busy = max(1, int(busy_threshold))
        self._homes: dict[str, ReplicaID] = {}

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Back off between rounds when every candidate is full, instead of spinning.
            pending_request.routing_context.should_backoff = True
        if not candidate_replicas:
            return []
        req = _forwarded(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        if req is not None and req.replica is not None:
            pinned = by_id.get(req.replica)
            return [[pinned]] if pinned is not None else []
        if req is None or req.affinity is None:
            # No affinity: the less loaded of two at random (Serve's default), then any.
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        home = by_id[rendezvous_order(req.affinity, by_id)[0]]
        if pending_request is not None:
            self._homes[pending_request.metadata.internal_request_id] = home.replica_id
        # A fresh count (it also refreshes Serve's cache, which its selection below reads); a
        # replica that does not answer in time counts as not busy.
        [(_, in_flight)] = await self._probe_queue_lens([home], 0)
        if in_flight is None or in_flight < self._busy:
            # Home first; should it be full, the least loaded of all.
            return [[home], candidate_replicas]
        return [candidate_replicas]

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        # Serve calls on_request_routed only under strict max_ongoing_requests: count here.
        replica = await super()._choose_replica_for_request(pending_request, is_retry=is_retry)
        req = _forwarded(pending_request)
        home = self._homes.pop(pending_request.metadata.internal_request_id, None)
        if req is not None and req.replica is not None:
            decision = "pinned"
        elif home is None:
            decision = "unkeyed"
        else:
            decision = "home" if home == replica.replica_id else "away"
        # The module's own counter (this class may be a by-value copy: see _forwarded).
        from allinone.scaleout import ray_serve

        ray_serve.ROUTED.labels(decision).inc()
        return replica


# -- the engine replica -------------------------------------------------------------------------


class EngineReplica:
    """One engine and the FastAPI app over it, in a Serve replica. ``env``: the replica's
    ``ALLINONE_*`` settings (like a container's environment)."""

    # Ray actors may have `async def __init__` (Serve awaits it).
    async def __init__(self, env: dict[str, str]) -> None:  # type: ignore[misc]
        from uvicorn.config import Config
        from uvicorn.lifespan.on import LifespanOn

        from allinone.api import create_app
        from allinone.settings import Settings

        os.environ.update(env)
        self.app = create_app(Settings())
        self._state = self.app.state.server
        self._lifespan = LifespanOn(Config(self.app, lifespan="on", log_config=None))
        await self._lifespan.startup()
        lifecycle = self._state.lifecycle
        # Serve starts health checks once __init__ returns: return when the model is loaded.
        while not lifecycle.ready.is_set():
            if lifecycle.load_error or lifecycle.fatal_error:
                raise RuntimeError(lifecycle.fatal_error or lifecycle.load_error)
            await asyncio.sleep(0.1)
        self.replica_id = serve.get_replica_context().replica_id.unique_id
        self.node_id = ray.get_runtime_context().get_node_id()
        self._extra_headers = [
            (REPLICA_HEADER.encode(), self.replica_id.encode()),
            (NODE_HEADER.encode(), self.node_id.encode()),
        ]

    async def __call__(self, req: ForwardedRequest) -> AsyncIterator[dict]:
        """Serve ``req`` with the app; yield its ASGI messages (the response's start carries
        the replica's id and node). Cancelled (the client left): the app sees a disconnect."""
        queue: asyncio.Queue[dict | None] = asyncio.Queue()
        disconnected = asyncio.Event()
        body_sent = False

        async def receive() -> dict:
            nonlocal body_sent
            if not body_sent:
                body_sent = True
                return {"type": "http.request", "body": req.body, "more_body": False}
            await disconnected.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], *self._extra_headers]}
            await queue.put(message)

        task = asyncio.create_task(self.app(req.scope(), receive, send))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        try:
            while (message := await queue.get()) is not None:
                yield message
            await task
        finally:
            disconnected.set()
            if not task.done():
                # The app's own hang-up handling cancels the engine work; wait for it a little.
                with contextlib.suppress(asyncio.TimeoutError, Exception):
                    await asyncio.wait_for(asyncio.shield(task), 5)
                task.cancel()

    async def _get(self, path: str) -> tuple[int, bytes]:
        status, chunks = 500, []
        async for m in self(ForwardedRequest("GET", path)):
            if m["type"] == "http.response.start":
                status = m["status"]
            elif m["type"] == "http.response.body":
                chunks.append(m.get("body", b""))
        return status, b"".join(chunks)

    async def check_health(self) -> None:
        """Serve's health check: the app's ``/ready``. Not ready for any reason but shedding
        load under memory pressure (the engine is alive then) fails it, and Serve replaces
        this replica."""
        status, body = await self._get("/ready")
        if status == 200:
            return
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            code = None
        if code == "memory_pressure":
            return
        raise RuntimeError(f"/ready answered {status}: {body[:300]!r}")

    async def __del__(self) -> None:
        # Serve's graceful shutdown: stop the engine (the app's lifespan end).
        lifespan = getattr(self, "_lifespan", None)
        if lifespan is not None:
            with contextlib.suppress(Exception):
                await lifespan.shutdown()


# -- the front (HTTP ingress) -------------------------------------------------------------------


def _error(status: int, message: str, code: str, retry_after: int | None = None) -> list[dict]:
    body = json.dumps(
        {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if retry_after is not None:
        headers.append((b"retry-after", str(retry_after).encode()))
    return [
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body, "more_body": False},
    ]


class FrontApp:
    """The ingress ASGI app: whole requests to the engine replicas, with their affinity key."""

    def __init__(self) -> None:
        self.engine: DeploymentHandle | None = None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                kind = message["type"].rsplit(".", 1)[-1]
                await send({"type": f"lifespan.{kind}.complete"})
                if kind == "shutdown":
                    return
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/metrics":
            await self._metrics(send)
            return
        body = bytearray()
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > FORWARD_BODY_LIMIT:
                for m in _error(413, "request body too large", "body_too_large"):
                    await send(m)
                return
        headers = list(scope.get("headers", []))
        req = ForwardedRequest(
            method=scope["method"],
            path=scope["path"],
            query_string=scope.get("query_string", b""),
            headers=headers,
            body=bytes(body),
            client=tuple(scope["client"]) if scope.get("client") else None,  # type: ignore[arg-type]
            scheme=scope.get("scheme", "http"),
            http_version=scope.get("http_version", "1.1"),
            affinity=affinity_key(scope["path"], bytes(body), headers),
        )
        await self._relay(req, receive, send)

    async def _relay(self, req: ForwardedRequest, receive: Any, send: Any) -> None:
        assert self.engine is not None
        gen: DeploymentResponseGenerator = self.engine.options(stream=True).remote(req)  # type: ignore[assignment]

        async def watch_disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            gen.cancel()

        watcher = asyncio.create_task(watch_disconnect())
        started = False
        try:
            async for message in gen:
                started = started or message["type"] == "http.response.start"
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    watcher.cancel()  # complete: a disconnect from now on cancels nothing
                await send(message)
        except RayActorError as exc:
            # The replica (or its node) died: nothing sent yet -> 503 with Retry-After, so a
            # client's retry goes to a live replica; mid-stream -> end the body.
            log.warning("engine replica lost: %s", exc)
            if not started:
                for m in _error(
                    503, "the replica serving this request was lost; retry", "replica_lost", 1
                ):
                    await send(m)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            watcher.cancel()

    async def _scrape(self, replica: str) -> str | None:
        assert self.engine is not None
        chunks, status = [], 0
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT_S):
                gen: DeploymentResponseGenerator = self.engine.options(stream=True).remote(
                    ForwardedRequest("GET", "/metrics", replica=replica)
                )  # type: ignore[assignment]
                async for m in gen:
                    if m["type"] == "http.response.start":
                        status = m["status"]
                    elif m["type"] == "http.response.body":
                        chunks.append(m.get("body", b""))
        except (TimeoutError, RayActorError):
            return None
        return b"".join(chunks).decode() if status == 200 else None

    async def _metrics(self, send: Any) -> None:
        replicas = engine_replica_ids(serve.get_replica_context().app_name)
        # One at a time: requests a replica makes inside one request share that request's
        # internal id, by which Serve's router matches a chosen replica to its request.
        gathered: dict[str, str | None] = {r: await self._scrape(r) for r in replicas}
        front = serve.get_replica_context().replica_id.unique_id
        gathered[f"front-{front}"] = generate_latest(ROUTER_REGISTRY).decode()
        body = gather_metrics(gathered)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})


def engine_replica_ids(app_name: str) -> list[str]:
    """Unique ids of the live engine replicas (their actors' names)."""
    prefix = f"SERVE_REPLICA::{app_name}#{ENGINE_DEPLOYMENT}#"
    names = ray.util.list_named_actors(all_namespaces=True)
    return sorted(
        a["name"][len(prefix) :] for a in names if str(a.get("name", "")).startswith(prefix)
    )


class _FrontBase:
    pass


_FrontIngress: Any = serve.ingress(FrontApp())(_FrontBase)


class FrontReplica(_FrontIngress):
    """The front's replica: the ingress app with the engine deployment's handle."""

    async def __init__(self, engine: DeploymentHandle) -> None:  # type: ignore[misc]
        await super().__init__()
        self.app.engine = engine


# -- the application ----------------------------------------------------------------------------


def app_builder(args: dict[str, Any]) -> Any:
    """The Serve application from ``RayServeOptions.to_args()`` (the config file's ``args``):
    ``serve run allinone.scaleout.ray_serve:app_builder`` or ``serve run serve.yaml``."""
    engine_opts = dict(args["engine"])
    router = engine_opts.pop("request_router_config", None)
    if router is not None:
        engine_opts["request_router_config"] = RequestRouterConfig(**router)
    deployment: Any = serve.deployment
    engine = deployment(EngineReplica, name=ENGINE_DEPLOYMENT, **engine_opts)
    front = deployment(FrontReplica, name=FRONT_DEPLOYMENT, **args["front"])
    return front.bind(engine.bind(dict(args["env"])))


def build_app(options: RayServeOptions) -> Any:
    """The Serve application for ``options``."""
    return app_builder(options.to_args())


def deploy(options: RayServeOptions, blocking: bool = False) -> DeploymentHandle:
    """Start Serve's HTTP proxies on ``options.host:port`` (every node) and run the application
    on the Ray cluster this process is connected to (``ray.init`` first)."""
    serve.start(
        http_options={"host": options.host, "port": options.port},
        proxy_location=options.proxy_location,
    )
    return serve.run(
        build_app(options),
        name=options.name or APP_NAME,
        route_prefix=options.route_prefix,
        blocking=blocking,
    )


def run(address: str, options: RayServeOptions) -> int:
    """``allinone serve --ray ADDRESS``: connect, deploy, serve until SIGINT/SIGTERM, then delete
    the application (the cluster keeps running)."""
    ray.init(address=address, log_to_driver=False)
    try:
        deploy(options)
        print(
            f"allinone: serving on Ray at {address}: http://{options.host}:{options.port}"
            f"{options.route_prefix} (replicas {options.min_replicas}..{options.max_replicas})",
            flush=True,
        )
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        serve.delete(options.name or APP_NAME)
    finally:
        ray.shutdown()
    return 0
