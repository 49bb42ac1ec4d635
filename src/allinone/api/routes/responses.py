"""OpenAI's Responses API: ``POST /v1/responses`` (plain and streamed); the serving is
``allinone.serving.responses``, over chat serving."""

from __future__ import annotations

from fastapi import Request

from allinone.api.dialects import dialect_router
from allinone.api.responses_protocol import ResponsesRequest, ResponsesResponse
from allinone.serving.responses import ResponsesServing
from allinone.serving.sse import event_stream

router = dialect_router(tags=["responses"])


@router.post(
    "/v1/responses",
    response_model=ResponsesResponse,
    summary="OpenAI Responses API: text, JSON under a schema, function calls (SSE with stream)",
)
async def create_response(body: ResponsesRequest, request: Request):
    serving = ResponsesServing(request.app.state.server, request)
    if body.stream:
        return event_stream(await serving.stream(body))
    return await serving.create(body)
