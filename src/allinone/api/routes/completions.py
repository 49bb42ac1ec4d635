"""Legacy text completions (``POST /v1/completions``, plain and streamed; the serving is
``allinone.serving.completions``) and the tokenizer routes (``POST /tokenize``,
``POST /detokenize``, in llama.cpp's server and vLLM's shapes)."""

from __future__ import annotations

from fastapi import Request

from allinone.api.completions_protocol import (
    CompletionRequest,
    Detokenized,
    DetokenizeRequest,
    TokenizeRequest,
)
from allinone.api.dialects import dialect_router
from allinone.api.state import Server
from allinone.serving.completions import completion

router = dialect_router(tags=["openai"])


@router.post("/v1/completions", summary="OpenAI legacy text completions (stream with SSE)")
async def completions(body: CompletionRequest, request: Request, state: Server):
    return await completion(state, request, body)


@router.post("/tokenize", summary="Token ids of a text (llama.cpp / vLLM shape)")
async def tokenize(body: TokenizeRequest, state: Server) -> dict:
    backend = state.admission.require_service().backend
    text = body.content if body.content is not None else body.prompt
    assert text is not None
    ids = backend.tokenize(text, special=body.add_special)
    out: dict = {"tokens": ids, "count": len(ids), "max_model_len": backend.context_tokens}
    if body.with_pieces:
        out["pieces"] = [backend.detokenize([t]) for t in ids]
    return out


@router.post("/detokenize", summary="The text of token ids (llama.cpp / vLLM shape)")
async def detokenize(body: DetokenizeRequest, state: Server) -> Detokenized:
    text = state.admission.require_service().backend.detokenize(body.tokens)
    return Detokenized(content=text, prompt=text)
