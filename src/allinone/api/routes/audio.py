"""Speech routes: OpenAI's ``POST /v1/audio/transcriptions`` and our voice-note pipeline
``POST /v1/audio/summaries`` (transcribe, then run an extract task on the transcript); the
serving is ``allinone.serving.speech``."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse, PlainTextResponse

from allinone.api.dialects import dialect_router
from allinone.api.state import Server
from allinone.serving.speech import SpeechServing
from allinone.speech import formats

router = dialect_router(tags=["audio"])


@router.post(
    "/v1/audio/transcriptions",
    summary="Transcribe an audio file (OpenAI-compatible; needs --speech)",
)
async def transcriptions(request: Request, state: Server):
    transcript, response_format, grains = await SpeechServing(state, request).transcription()
    body = formats.render(transcript, response_format, grains)
    headers = {"x-audio-duration-s": f"{transcript.duration:.3f}", "x-rtf": f"{transcript.rtf:.3f}"}
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=formats.MEDIA_TYPES[response_format], headers=headers)


@router.post(
    "/v1/audio/summaries",
    summary="A voice note: transcribe it, then run an extract task (default voice-note: emotion "
    "with probabilities and a summary) on the transcript (needs --speech)",
)
async def summaries(request: Request, state: Server) -> JSONResponse:
    return JSONResponse(await SpeechServing(state, request).voice_note())
