"""Anthropic's Messages API: /v1/messages (plain and streamed) and /v1/messages/count_tokens;
the serving is ``allinone.serving.messages``, errors are in Anthropic's shape."""

from __future__ import annotations

from fastapi import Request

from allinone.api.dialects import dialect_router
from allinone.api.messages_protocol import (
    Message,
    MessageCountTokensParams,
    MessageCreateParams,
    MessageTokensCount,
)
from allinone.serving.messages import ANTHROPIC, MessagesServing
from allinone.serving.sse import event_stream

router = dialect_router(ANTHROPIC, tags=["anthropic"])


@router.post(
    "/v1/messages",
    response_model=Message,
    summary="Anthropic Messages: a reply to a conversation (stream with SSE events)",
)
async def create_message(body: MessageCreateParams, request: Request):
    serving = MessagesServing(request.app.state.server, request)
    if body.stream:
        return event_stream(await serving.stream(body))
    return await serving.create(body)


@router.post(
    "/v1/messages/count_tokens",
    response_model=MessageTokensCount,
    summary="Anthropic Messages: the prompt's tokens, without generating",
)
async def count_tokens(body: MessageCountTokensParams, request: Request) -> MessageTokensCount:
    return MessagesServing(request.app.state.server, request).count_tokens(body)
