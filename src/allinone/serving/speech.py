"""The voice-note pipeline, one for the server (``POST /v1/audio/summaries``) and the CLI
(``allinone listen``): transcribe, then run an extract task on the transcript; both answer
with :func:`voice_note` 's shape."""

from __future__ import annotations

from typing import Any

from allinone.serving.errors import InputError
from allinone.speech.transcriber import Transcript
from allinone.tasks import TaskRegistry, TaskSpec

DEFAULT_TASK = "voice-note"


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
