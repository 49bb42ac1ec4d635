"""Decision routes: OpenAI's ``POST /v1/decisions``, ``POST /v1/decide`` (decide tasks) and
TypeSafe's ``POST /v1/systemone``; the serving is ``allinone.serving.decisions``. Errors:
``/v1/decisions`` names fields as ``questions[2].choices``; ``/v1/systemone`` answers in
TypeSafe's shapes (``allinone.api.dialects``)."""

from __future__ import annotations

from fastapi import Request

from allinone.api.decisions_protocol import (
    DecisionRequest,
    DecisionResponse,
    SystemOneRequest,
    SystemOneResponse,
    TaskDecisionRequest,
    TaskDecisionResponse,
)
from allinone.api.dialects import DecisionsDialect, TypeSafeDialect, dialect_router
from allinone.serving import decisions as serving

openai_router = dialect_router(DecisionsDialect(), tags=["decisions"])
tasks_router = dialect_router(tags=["decisions"])
typesafe_router = dialect_router(TypeSafeDialect(), tags=["decisions"])
routers = (openai_router, tasks_router, typesafe_router)


@openai_router.post(
    "/v1/decisions",
    response_model=DecisionResponse,
    summary="OpenAI Decisions API: predicate, choice and score questions about one input",
)
async def decisions(body: DecisionRequest, request: Request) -> DecisionResponse:
    return await serving.openai_decisions(body, request)


@tasks_router.post(
    "/v1/decide",
    response_model=TaskDecisionResponse,
    summary="Run a decide task: its named questions about one input, answered together",
)
async def decide_task(body: TaskDecisionRequest, request: Request) -> TaskDecisionResponse:
    return await serving.task_decision(body, request)


@typesafe_router.post(
    "/v1/systemone",
    response_model=SystemOneResponse,
    summary="TypeSafe System One API: noul, choice and score questions keyed by id",
)
async def systemone(body: SystemOneRequest, request: Request) -> SystemOneResponse:
    return await serving.systemone(body, request)
