"""Speech routes: OpenAI's ``POST /v1/audio/transcriptions`` and our voice-note pipeline
``POST /v1/audio/summaries`` (transcribe, then run an extract task on the transcript).

Both take ``multipart/form-data`` as the ``openai`` SDK sends it (arrays as ``name[]``). Every
form field is either honoured or refused with a 400 naming it; unknown fields are refused too.
Checked before any work: the upload's size (413, ALLINONE_SPEECH_MAX_UPLOAD_MB, in the body
middleware), that it is audio, and its declared duration (400). The transcription then waits for
the speech worker (one at a time; a full queue is 503) under the request's timeout, the drain
deadline and the client's connection, like every route.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.datastructures import UploadFile

from allinone.api.state import ServerState
from allinone.backends.base import PromptTooLongError
from allinone.errors import InvalidRequestError, NotFoundError, ShuttingDownError, to_api_error
from allinone.speech import formats
from allinone.speech.audio import AudioError, check_duration
from allinone.speech.transcriber import TranscribeOptions, Transcript, TranscriptionCancelled
from allinone.speech.worker import SpeechWorker
from allinone.tasks import TaskError

router = APIRouter(tags=["audio"])

# Fields of OpenAI's transcription request that change the output and that we do not implement.
_REFUSED = {
    "stream": "streamed transcriptions are not supported; omit stream (or send false)",
    "include[]": "include (token logprobs) is not supported; omit it",
    "include": "include (token logprobs) is not supported; omit it",
    "chunking_strategy": "chunking_strategy is not supported (audio is cut by voice "
    "activity detection); omit it",
}
_TRANSCRIBE_FIELDS = {
    "file",
    "model",
    "language",
    "prompt",
    "response_format",
    "temperature",
    "timestamp_granularities[]",
    "timestamp_granularities",
}
_SUMMARY_FIELDS = {"file", "model", "language", "prompt", "temperature", "task"}
MODEL_ALIASES = ("whisper-1",)  # the id OpenAI clients send by default


async def _read_form(request: Request, allowed: set[str]) -> tuple[dict[str, list[Any]], bytes]:
    """The form's fields (name -> values) and the uploaded file's bytes; 400s name the field."""
    ctype = request.headers.get("content-type", "")
    if not ctype.startswith("multipart/form-data"):
        raise InvalidRequestError(
            "send the audio as multipart/form-data with the file in a 'file' field "
            f"(got content-type {ctype or 'none'!r})",
            code="invalid_content_type",
        )
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # python-multipart / Starlette parse errors
        raise InvalidRequestError(
            f"the multipart body could not be read: {getattr(exc, 'detail', exc)}"
        ) from exc
    fields: dict[str, list[Any]] = {}
    for key, value in form.multi_items():
        fields.setdefault(key, []).append(value)
    for key, values in fields.items():
        if key in _REFUSED:
            if key == "stream" and all(str(v).lower() == "false" for v in values):
                continue
            raise InvalidRequestError(_REFUSED[key], param=key.removesuffix("[]"))
        if key not in allowed:
            raise InvalidRequestError(
                f"unknown field {key!r}; this route accepts: {', '.join(sorted(allowed))}",
                param=key,
            )
        if len(values) > 1 and not key.endswith("[]"):
            raise InvalidRequestError(f"{key} is given {len(values)} times; send it once", key)
    uploads = fields.get("file", [])
    if not uploads or not isinstance(uploads[0], UploadFile):
        raise InvalidRequestError("no audio: send the file in a multipart 'file' field", "file")
    upload: UploadFile = uploads[0]
    data = await upload.read()
    await form.close()
    if not data:
        raise InvalidRequestError("the file is empty (0 bytes): send an audio file", "file")
    return fields, data


def _text(fields: dict[str, list[Any]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    value = values[0]
    if isinstance(value, UploadFile):
        raise InvalidRequestError(f"{name} must be a text field, not a file", param=name)
    return str(value)


def _options(
    speech: SpeechWorker, fields: dict[str, list[Any]], words: bool = False
) -> TranscribeOptions:
    """The transcription options from the form, checked against the loaded speech model."""
    model = _text(fields, "model")
    name = speech.transcriber.name
    if model not in (None, "", name, *MODEL_ALIASES):
        from allinone.models.speech import get_speech_entry

        entry = get_speech_entry(model)
        if entry is None or entry.name != name:
            raise NotFoundError(
                f"speech model {model!r} is not served here; this server runs {name} "
                f"(also answering to {', '.join(MODEL_ALIASES)})",
                param="model",
                code="model_not_found",
            )
    language = _text(fields, "language") or None
    if language is not None:
        language = language.strip().lower()
        if language not in speech.transcriber.languages:
            raise InvalidRequestError(
                f"language {language!r} is not one {name} transcribes; send an ISO 639-1 code "
                f"({', '.join(speech.transcriber.languages[:8])}, ...) or omit it to detect",
                param="language",
            )
    temperature = None
    raw_temp = _text(fields, "temperature")
    if raw_temp not in (None, ""):
        try:
            temperature = float(raw_temp)
        except ValueError:
            temperature = -1.0
        if not 0.0 <= temperature <= 1.0:
            raise InvalidRequestError(
                f"temperature must be a number from 0 to 1 (got {raw_temp!r})",
                param="temperature",
            )
    return TranscribeOptions(
        language=language,
        prompt=_text(fields, "prompt") or None,
        temperature=temperature,
        word_timestamps=words,
    )


def _audio_error(exc: AudioError) -> InvalidRequestError:
    code = "audio_too_long" if exc.too_long else "invalid_audio"
    return InvalidRequestError(str(exc), param="file", code=code)


async def _transcribe(
    state: ServerState,
    speech: SpeechWorker,
    request: Request,
    data: bytes,
    options: TranscribeOptions,
    deadline: float,
) -> Transcript:
    limit = state.settings.speech.speech_max_duration_s
    try:
        check_duration(data, limit)  # before any work is queued
    except AudioError as exc:
        raise _audio_error(exc) from exc
    job = speech.submit(data, options, limit)
    try:
        return await state.bounded(
            speech.result(job), "the transcription", deadline=deadline, request=request
        )
    except TranscriptionCancelled as exc:  # the worker was closed under it: shutting down
        raise ShuttingDownError(f"the transcription was stopped: {exc}") from exc
    except AudioError as exc:
        raise _audio_error(exc) from exc
    except ValueError as exc:  # a language the model refuses
        raise InvalidRequestError(str(exc), param="language") from exc


@router.post(
    "/v1/audio/transcriptions",
    summary="Transcribe an audio file (OpenAI-compatible; needs --speech)",
)
async def transcriptions(request: Request):
    state: ServerState = request.app.state.server
    deadline = time.monotonic() + state.settings.server.request_timeout_s
    speech = state.require_speech()
    fields, data = await _read_form(request, _TRANSCRIBE_FIELDS)
    response_format = (_text(fields, "response_format") or "json").strip()
    if response_format not in formats.RESPONSE_FORMATS:
        raise InvalidRequestError(
            f"response_format {response_format!r} is not one of "
            f"{', '.join(formats.RESPONSE_FORMATS)}",
            param="response_format",
        )
    grains = [
        str(v)
        for key in ("timestamp_granularities[]", "timestamp_granularities")
        for v in fields.get(key, [])
    ]
    for g in grains:
        if g not in ("word", "segment"):
            raise InvalidRequestError(
                f"timestamp_granularities holds {g!r}; use 'word' and/or 'segment'",
                param="timestamp_granularities",
            )
    if grains and response_format != "verbose_json":
        raise InvalidRequestError(
            "timestamp_granularities needs response_format 'verbose_json'",
            param="timestamp_granularities",
        )
    options = _options(speech, fields, words="word" in grains)
    transcript = await _transcribe(state, speech, request, data, options, deadline)
    body = formats.render(transcript, response_format, frozenset(grains))
    headers = {"x-audio-duration-s": f"{transcript.duration:.3f}", "x-rtf": f"{transcript.rtf:.3f}"}
    if isinstance(body, dict):
        return JSONResponse(body, headers=headers)
    return PlainTextResponse(body, media_type=formats.MEDIA_TYPES[response_format], headers=headers)


@router.post(
    "/v1/audio/summaries",
    summary="A voice note: transcribe it, then run an extract task (default voice-note: emotion "
    "with probabilities and a summary) on the transcript (needs --speech)",
)
async def summaries(request: Request) -> JSONResponse:
    state: ServerState = request.app.state.server
    t0 = time.perf_counter()
    deadline = time.monotonic() + state.settings.server.request_timeout_s
    speech = state.require_speech()
    fields, data = await _read_form(request, _SUMMARY_FIELDS)
    task_name = _text(fields, "task") or "voice-note"
    request.state.task = task_name
    try:
        task = state.tasks.get(task_name)
    except TaskError as exc:
        raise to_api_error(exc, param="task") from exc
    if task.kind != "extract":
        raise InvalidRequestError(
            f"task {task_name!r} is a {task.kind} task; a voice note needs an extract task "
            "(e.g. voice-note)",
            param="task",
        )
    options = _options(speech, fields)
    transcript = await _transcribe(state, speech, request, data, options, deadline)
    heard = time.perf_counter()
    if not transcript.text.strip():
        raise InvalidRequestError(
            "no speech was recognised in the audio, so there is nothing to summarise",
            param="file",
            code="no_speech",
        )
    service = state.require_service()
    try:
        result = await state.bounded(
            service.extract_async(task_name, transcript.text),
            "the voice note's task",
            deadline=deadline,
            request=request,
        )
    except (TaskError, PromptTooLongError) as exc:
        raise to_api_error(exc, param="file") from exc
    done = time.perf_counter()
    return JSONResponse(
        {
            "object": "audio.summary",
            "task": task_name,
            "model": service.backend.model_id,
            "speech_model": speech.transcriber.name,
            "transcript": {
                "text": transcript.text,
                "language": transcript.language,
                "duration": round(transcript.duration, 3),
            },
            "output": result.output,
            "scores": result.scores,
            "usage": {
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
                "audio_seconds": round(transcript.duration, 3),
            },
            "timings_ms": {
                "transcription": round((heard - t0) * 1000, 1),
                "task": round((done - heard) * 1000, 1),
                "total": round((done - t0) * 1000, 1),
                "rtf": round(transcript.rtf, 3),
            },
        }
    )
