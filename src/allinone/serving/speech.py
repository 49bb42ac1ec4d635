"""Speech serving: OpenAI's transcriptions and the voice-note pipeline, one for the server
(``POST /v1/audio/summaries``) and the CLI (``allinone listen``): transcribe, then run an
extract task on the transcript; both answer with :func:`voice_note` 's shape.

The routes take ``multipart/form-data`` as the ``openai`` SDK sends it (arrays as ``name[]``).
Every form field is either honoured or refused with a 400 naming it; unknown fields are refused
too. Checked before any work: the upload's size (413, ALLINONE_SPEECH_MAX_UPLOAD_MB, in the body
middleware), that it is audio, and its declared duration (400). The transcription then waits for
the speech worker (one at a time; a full queue is 503) within the request's scope (timeout,
drain deadline, the client's connection), like every route.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from starlette.datastructures import UploadFile

from allinone.errors import ShuttingDownError
from allinone.serving.errors import InputError
from allinone.serving.scope import RequestScope
from allinone.speech import formats
from allinone.speech.audio import check_duration
from allinone.speech.transcriber import TranscribeOptions, Transcript, TranscriptionCancelled
from allinone.speech.worker import SpeechWorker
from allinone.tasks import TaskRegistry, TaskSpec

if TYPE_CHECKING:
    from fastapi import Request

    from allinone.api.state import ServerState

DEFAULT_TASK = "voice-note"

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
        raise InputError(
            "send the audio as multipart/form-data with the file in a 'file' field "
            f"(got content-type {ctype or 'none'!r})",
            code="invalid_content_type",
        )
    try:
        form = await request.form(max_files=1, max_fields=32)
    except Exception as exc:  # python-multipart / Starlette parse errors
        raise InputError(
            f"the multipart body could not be read: {getattr(exc, 'detail', exc)}"
        ) from exc
    fields: dict[str, list[Any]] = {}
    for key, value in form.multi_items():
        fields.setdefault(key, []).append(value)
    for key, values in fields.items():
        if key in _REFUSED:
            if key == "stream" and all(str(v).lower() == "false" for v in values):
                continue
            raise InputError(_REFUSED[key], param=key.removesuffix("[]"))
        if key not in allowed:
            raise InputError(
                f"unknown field {key!r}; this route accepts: {', '.join(sorted(allowed))}",
                param=key,
            )
        if len(values) > 1 and not key.endswith("[]"):
            raise InputError(f"{key} is given {len(values)} times; send it once", key)
    uploads = fields.get("file", [])
    if not uploads or not isinstance(uploads[0], UploadFile):
        raise InputError("no audio: send the file in a multipart 'file' field", "file")
    upload: UploadFile = uploads[0]
    data = await upload.read()
    await form.close()
    if not data:
        raise InputError("the file is empty (0 bytes): send an audio file", "file")
    return fields, data


def _text(fields: dict[str, list[Any]], name: str) -> str | None:
    values = fields.get(name)
    if not values:
        return None
    value = values[0]
    if isinstance(value, UploadFile):
        raise InputError(f"{name} must be a text field, not a file", param=name)
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
            raise InputError(
                f"speech model {model!r} is not served here; this server runs {name} "
                f"(also answering to {', '.join(MODEL_ALIASES)})",
                param="model",
                not_found=True,
                code="model_not_found",
            )
    language = _text(fields, "language") or None
    if language is not None:
        language = language.strip().lower()
        if language not in speech.transcriber.languages:
            raise InputError(
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
            raise InputError(
                f"temperature must be a number from 0 to 1 (got {raw_temp!r})",
                param="temperature",
            )
    return TranscribeOptions(
        language=language,
        prompt=_text(fields, "prompt") or None,
        temperature=temperature,
        word_timestamps=words,
    )


def voice_note_task(tasks: TaskRegistry, name: str | None) -> TaskSpec:
    """The extract task a voice note runs (default ``voice-note``); InputError (``task``) for
    an unknown task (404) or one of another kind (400)."""
    task = tasks.get(name or DEFAULT_TASK)
    if task.kind != "extract":
        raise InputError(
            f"task {task.name!r} is a {task.kind} task; a voice note needs an extract task "
            f"(e.g. {DEFAULT_TASK})",
            param="task",
        )
    return task


def require_speech(transcript: Transcript) -> str:
    """The transcript's text; InputError (``file``, ``no_speech``) when nothing was heard, so
    there is nothing to run the task on."""
    if not transcript.text.strip():
        raise InputError(
            "no speech was recognised in the audio, so there is nothing to summarise",
            param="file",
            code="no_speech",
        )
    return transcript.text


def voice_note(
    task: str,
    model: str,
    speech_model: str,
    transcript: Transcript,
    result: Any,
    timings_ms: dict[str, float],
) -> dict[str, Any]:
    """A voice note's answer: the transcript, the task's output and scores, usage (tokens
    and audio seconds) and timings in ms (``transcription``, ``task``, ``total``) with the
    transcription's real-time factor ``rtf`` (processing time / audio duration).
    ``result``: the task's ``ExtractResult``, or None when only the transcript was asked for."""
    out: dict[str, Any] = {
        "object": "audio.summary",
        "task": task,
        "model": model,
        "speech_model": speech_model,
        "transcript": {
            "text": transcript.text,
            "language": transcript.language,
            "duration": round(transcript.duration, 3),
        },
    }
    usage: dict[str, Any] = {"audio_seconds": round(transcript.duration, 3)}
    if result is not None:
        out |= {"output": result.output, "scores": result.scores}
        usage |= {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }
    timings = {k: round(v, 1) for k, v in timings_ms.items()}
    out |= {"usage": usage, "timings_ms": {**timings, "rtf": round(transcript.rtf, 3)}}
    return out


class SpeechServing:
    """Serves one audio request (``request``: its Starlette request, whose form it reads)."""

    def __init__(self, state: ServerState, request: Request) -> None:
        self.state = state
        self.request = request
        self.speech: SpeechWorker = state.admission.require_speech()
        # One deadline for the whole request: the transcription and the task after it.
        self.scope = RequestScope(state, request, "the transcription", input_param="file")

    async def _transcribe(self, data: bytes, options: TranscribeOptions) -> Transcript:
        limit = self.state.settings.speech.speech_max_duration_s
        check_duration(data, limit)  # before any work is queued
        job = self.speech.submit(data, options, limit)
        try:
            return await self.scope.run(self.speech.result(job))
        except TranscriptionCancelled as exc:  # the worker was closed under it: shutting down
            raise ShuttingDownError(f"the transcription was stopped: {exc}") from exc

    async def transcription(self) -> tuple[Transcript, str, frozenset[str]]:
        """OpenAI's transcription: the transcript, the ``response_format`` to render it in
        (``speech.formats``) and the timestamp granularities asked for."""
        fields, data = await _read_form(self.request, _TRANSCRIBE_FIELDS)
        response_format = (_text(fields, "response_format") or "json").strip()
        if response_format not in formats.RESPONSE_FORMATS:
            raise InputError(
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
                raise InputError(
                    f"timestamp_granularities holds {g!r}; use 'word' and/or 'segment'",
                    param="timestamp_granularities",
                )
        if grains and response_format != "verbose_json":
            raise InputError(
                "timestamp_granularities needs response_format 'verbose_json'",
                param="timestamp_granularities",
            )
        options = _options(self.speech, fields, words="word" in grains)
        return await self._transcribe(data, options), response_format, frozenset(grains)

    async def voice_note(self) -> dict[str, Any]:
        """A voice note (:func:`voice_note`'s shape) from the form's audio and task."""
        t0 = time.perf_counter()
        fields, data = await _read_form(self.request, _SUMMARY_FIELDS)
        task = voice_note_task(self.state.tasks, _text(fields, "task"))
        self.request.state.task = task.name
        transcript = await self._transcribe(data, _options(self.speech, fields))
        heard = time.perf_counter()
        service = self.state.admission.require_service()
        text = require_speech(transcript)
        result = await self.scope.run(service.extract_async(task.name, text), "the voice note")
        done = time.perf_counter()
        timings = {"transcription": heard - t0, "task": done - heard, "total": done - t0}
        return voice_note(
            task.name,
            service.backend.model_id,
            self.speech.transcriber.name,
            transcript,
            result,
            {k: v * 1000 for k, v in timings.items()},
        )
