"""Liveness and readiness."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from allinone.api.state import Server
from allinone.cpu_budget import cpu_budget
from allinone.errors import NotReadyError

router = APIRouter(tags=["health"])


@router.get("/health", summary="Liveness: 200 while the process can serve; 503 once it cannot")
async def health(state: Server):
    if state.lifecycle.engine_dead:
        # The Kubernetes liveness probe `allinone deploy k8s` renders reads this: restart us.
        return JSONResponse(
            {
                "status": "dead",
                "ready": False,
                "draining": state.admission.draining,
                "error": state.lifecycle.fatal_error,
            },
            status_code=503,
        )
    return {
        "status": "ok",
        "ready": state.lifecycle.ready.is_set(),
        "draining": state.admission.draining,
    }


@router.get("/ready", summary="Readiness: 503 until the model is loaded, then 200")
async def ready(state: Server) -> dict:
    service = state.admission.require_service(count=False)
    backend = service.backend
    if not backend.health():
        raise NotReadyError("the engine is not running", code="engine_dead")
    return {
        "status": "ready",
        "model": backend.model_id,
        "speech_model": state.lifecycle.speech.transcriber.name if state.lifecycle.speech else None,
        "load_seconds": state.lifecycle.load_seconds,
        "threads": {"count": state.settings.engine.threads, "default": asdict(cpu_budget())},
        "memory": state.memory_budget.as_dict() if state.memory_budget else None,
        "engine": state.lifecycle.engine_stats(),
    }


@router.get("/metrics", summary="Prometheus metrics (allinone_*)")
async def metrics(state: Server) -> Response:
    registry = state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
