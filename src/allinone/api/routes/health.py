"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: the process is up and answering")
async def health(request: Request) -> dict:
    state = request.app.state.server
    return {"status": "ok", "ready": state.ready.is_set(), "draining": state.draining}


@router.get("/ready", summary="Readiness: 503 until the model is loaded, then 200")
async def ready(request: Request) -> dict:
    state = request.app.state.server
    service = state.require_service()
    backend = service.backend
    if not backend.health():
        from allinone.errors import NotReadyError

        raise NotReadyError("the engine is not running")
    return {
        "status": "ready",
        "model": backend.model_id,
        "load_seconds": state.load_seconds,
        "engine": backend.stats(),
    }


@router.get("/metrics", summary="Prometheus metrics (allinone_*)")
async def metrics(request: Request) -> Response:
    registry = request.app.state.server.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
