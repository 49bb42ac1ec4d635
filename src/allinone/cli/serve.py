"""`allinone serve`: the HTTP server."""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from allinone.cli.common import FlagGroups, add_command, load_settings


def _serve_on_ray(args: argparse.Namespace) -> int:
    """``serve --ray ADDRESS``: this server's replicas as a Serve application on a Ray cluster,
    sized by the planner from this command's model and engine settings."""
    import os

    from allinone.planner.plan import PlanRequest, make_plan
    from allinone.scaleout.ray_config import RayServeOptions
    from allinone.scaleout.ray_serve import run

    settings = load_settings(args)
    engine = settings.engine
    plan = make_plan(
        PlanRequest(
            model=settings.model.model,
            context=engine.ctx_per_seq,
            concurrency=engine.parallel,
            threads=engine.threads,
        )
    )
    # The replicas' settings: the plan's, then this environment's ALLINONE_* variables.
    env = {k: v for k, v in os.environ.items() if k.startswith("ALLINONE_")}
    if settings.model.model_id:
        env["ALLINONE_MODEL_ID"] = settings.model.model_id
    options = RayServeOptions.from_plan(
        plan,
        min_replicas=args.min_replicas,
        max_replicas=args.max_replicas,
        host=settings.server.host,
        port=settings.server.port,
        env_extra=env,
    )
    return run(args.ray, options)


def cmd_serve(args: argparse.Namespace) -> int:
    if getattr(args, "ray", None):
        return _serve_on_ray(args)
    import uvicorn

    from allinone.api import create_app
    from allinone.api.http_protocol import HttpLimits, http_protocol
    from allinone.observability.logs import configure_json_logging

    settings = load_settings(args)
    app = create_app(settings)
    state = app.state.server

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: refuse new work and fail /ready at once, let requests in flight
        finish up to the drain timeout, end the rest cleanly (503 envelope, or a stream's error
        event and [DONE]), then exit 0."""

        def handle_exit(self, sig, frame) -> None:
            state.admission.begin_drain()
            super().handle_exit(sig, frame)

    # httptools with the limits uvicorn lacks: header size and count (431), the time to send
    # the headers and the pauses in a body (408).
    protocol = http_protocol(
        HttpLimits.from_settings(settings.server),
        on_refuse=lambda reason: state.metrics.rejected.labels(reason).inc(),
    )
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        http=protocol,
        log_level=settings.server.log_level,
        log_config=None,
        # Past our own drain deadline requests end themselves with a clean error; uvicorn's hard
        # cut comes later, only for a connection that still will not close.
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) + 5,
    )
    configure_json_logging(settings.server.log_level)
    # After a graceful shutdown uvicorn re-raises the signal it caught, under the handler that
    # was there before it started: make that a clean exit, which is what a drain is.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = DrainingServer(config)

    def fatal(message: str) -> None:
        logging.getLogger("allinone.serve").error("cannot serve, exiting: %s", message)
        server.should_exit = True  # uvicorn's main loop polls this flag

    state.lifecycle.on_fatal = fatal
    server.run()
    if state.lifecycle.fatal_error:
        print(f"allinone serve: {state.lifecycle.fatal_error}", file=sys.stderr)
        return 1
    return 0


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """serve: every group of settings."""
    p = add_command(
        sub,
        "serve",
        cmd_serve,
        "run the HTTP server",
        [*flags.llm, flags.server, flags.speech, flags.replicas],
    )
    p.add_argument(
        "--ray",
        metavar="ADDRESS",
        help="run as replicas on the Ray cluster at ADDRESS (ray[serve]; docs/scale-out.md)",
    )
