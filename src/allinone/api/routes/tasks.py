"""Task endpoints: classification over any classify task, and the task list."""

from __future__ import annotations

import time

from fastapi import Request

from allinone.api.dialects import dialect_router
from allinone.api.protocol import (
    ClassifyItem,
    ClassifyRequest,
    ClassifyResponse,
    ClassifyUsage,
    ExtractRequest,
    ExtractResponse,
    UsageInfo,
)
from allinone.api.state import Server
from allinone.serving.errors import InputError
from allinone.serving.scope import RequestScope

router = dialect_router(tags=["tasks"])


@router.post(
    "/v1/classify",
    response_model=ClassifyResponse,
    response_model_exclude_none=True,
    summary="Classify one text or a list of texts with a classify task; labels are constrained",
)
async def classify(body: ClassifyRequest, request: Request, state: Server) -> ClassifyResponse:
    request.state.task = body.task
    service = state.admission.require_service()
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InputError("input is an empty list: send at least one text", param="input")
    limit = state.settings.server.max_batch_inputs
    if len(texts) > limit:
        raise InputError(
            f"input has {len(texts)} texts; at most {limit} per request "
            "(ALLINONE_MAX_BATCH_INPUTS)",
            param="input",
        )
    t0 = time.perf_counter()
    # On timeout, hang-up or the drain deadline classify_async is cancelled; its cleanup
    # cancels the engine work.
    scope = RequestScope(state, request, "classification", input_param="input")
    results = await scope.run(service.classify_async(body.task, texts))
    return ClassifyResponse(
        task=body.task,
        model=service.backend.model_id,
        results=[
            ClassifyItem(
                index=i, label=r.label, scores=r.scores, flagged=r.flagged, category=r.category
            )
            for i, r in enumerate(results)
        ],
        usage=ClassifyUsage(
            prompt_tokens=sum(r.prompt_tokens for r in results),
            cached_tokens=sum(r.cached_tokens for r in results),
        ),
        latency_ms=round((time.perf_counter() - t0) * 1000, 2),
    )


@router.post(
    "/v1/extract",
    response_model=ExtractResponse,
    summary="Run an extract task (e.g. summarize): a JSON answer that always parses",
)
async def extract(body: ExtractRequest, request: Request, state: Server) -> ExtractResponse:
    request.state.task = body.task
    service = state.admission.require_service()
    # Fields run one after another; cancelling stops the field in the engine.
    scope = RequestScope(state, request, "extraction", input_param="input")
    result = await scope.run(service.extract_async(body.task, body.input))
    return ExtractResponse(
        task=result.task,
        model=service.backend.model_id,
        output=result.output,
        scores=result.scores,
        usage=UsageInfo(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            total_tokens=result.prompt_tokens + result.completion_tokens,
        ),
        latency_ms=round(result.latency_ms, 2),
    )


@router.get("/v1/tasks", summary="Every task this server runs, with its kind and labels")
async def list_tasks(state: Server) -> dict:
    return {
        "object": "list",
        "data": [
            {
                "name": t.name,
                "kind": t.kind,
                "description": t.description,
                "labels": t.labels or None,
                "questions": [q.name for q in t.questions] or None,
                "max_input_chars": t.input.max_chars,
                "max_output_chars": t.output.max_chars,
            }
            for t in state.tasks
        ],
    }
