"""A Transcript in OpenAI's transcription response formats: json, text, srt, verbose_json, vtt.

Shapes from OpenAI's API reference as the ``openai`` SDK models them (``Transcription``,
``TranscriptionVerbose``, ``TranscriptionSegment``, ``TranscriptionWord``): json is
``{"text", "usage"}``; verbose_json adds ``task``, ``language`` (a language *name*, e.g.
"english"), ``duration``, ``segments`` and, when asked for, ``words``; text, srt and vtt are plain
text bodies.
"""

from __future__ import annotations

from typing import Any

from allinone.speech.transcriber import Transcript

RESPONSE_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
MEDIA_TYPES = {
    "json": "application/json",
    "verbose_json": "application/json",
    "text": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
}

# Whisper's names (openai-whisper's tokenizer.LANGUAGES) for the languages users of this
# project send most; other codes are reported as the code itself.
LANGUAGE_NAMES = {
    "en": "english",
    "zh": "chinese",
    "de": "german",
    "es": "spanish",
    "ru": "russian",
    "ko": "korean",
    "fr": "french",
    "ja": "japanese",
    "pt": "portuguese",
    "tr": "turkish",
    "pl": "polish",
    "it": "italian",
    "nl": "dutch",
    "ar": "arabic",
    "vi": "vietnamese",
    "th": "thai",
    "id": "indonesian",
    "hi": "hindi",
    "uk": "ukrainian",
    "yue": "cantonese",
}


def usage(t: Transcript) -> dict[str, Any]:
    """OpenAI's duration usage for whisper-1: whole seconds of audio, rounded up."""
    return {"type": "duration", "seconds": int(-(-t.duration // 1))}


def as_json(t: Transcript) -> dict[str, Any]:
    """``response_format=json``."""
    return {"text": t.text, "usage": usage(t)}


def as_verbose_json(t: Transcript, words: bool, segments: bool = True) -> dict[str, Any]:
    """``response_format=verbose_json``; ``words`` adds word timings (timestamp granularity
    "word"), ``segments`` keeps the segment list (on unless only words were asked for)."""
    body: dict[str, Any] = {
        "task": "transcribe",
        "language": LANGUAGE_NAMES.get(t.language, t.language),
        "duration": round(t.duration, 3),
        "text": t.text,
        "usage": usage(t),
    }
    if segments:
        body["segments"] = [
            {
                "id": s.id,
                "seek": s.seek,
                "start": s.start,
                "end": s.end,
                "text": s.text,
                "tokens": s.tokens,
                "temperature": s.temperature,
                "avg_logprob": s.avg_logprob,
                "compression_ratio": s.compression_ratio,
                "no_speech_prob": s.no_speech_prob,
            }
            for s in t.segments
        ]
    if words:
        body["words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in t.words]
    return body


def _stamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def as_srt(t: Transcript) -> str:
    """SubRip: numbered cues, ``HH:MM:SS,mmm --> HH:MM:SS,mmm``, blank line between cues."""
    cues = [
        f"{i}\n{_stamp(s.start, ',')} --> {_stamp(s.end, ',')}\n{s.text.strip()}\n"
        for i, s in enumerate(t.segments, 1)
    ]
    return "\n".join(cues)


def as_vtt(t: Transcript) -> str:
    """WebVTT: a ``WEBVTT`` header, then cues ``HH:MM:SS.mmm --> HH:MM:SS.mmm``."""
    cues = [
        f"{_stamp(s.start, '.')} --> {_stamp(s.end, '.')}\n{s.text.strip()}\n" for s in t.segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def render(t: Transcript, response_format: str, granularities: frozenset[str]) -> Any:
    """The body for ``response_format``: a dict (json kinds) or a str (text kinds)."""
    if response_format == "json":
        return as_json(t)
    if response_format == "verbose_json":
        words = "word" in granularities
        return as_verbose_json(t, words, segments="segment" in granularities or not words)
    if response_format == "srt":
        return as_srt(t)
    if response_format == "vtt":
        return as_vtt(t)
    return t.text + "\n"
