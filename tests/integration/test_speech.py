"""Speech in, against a real server on loopback with the real models (default LLM + Whisper-base):
the openai SDK's ``audio.transcriptions.create`` in every response format, accuracy on the
committed espeak-ng clips (tests/data/audio/make_clips.sh), every container format we claim,
bad uploads answered with envelopes while the server keeps serving, cancellation, the voice-note
pipeline, ``allinone listen``, and a server without --speech."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import time
import unicodedata
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from allinone.server_process import ServerProcess

AUDIO = Path(__file__).resolve().parents[1] / "data" / "audio"
EN_REF = (AUDIO / "en.txt").read_text(encoding="utf-8").strip()
ZH_REF = (AUDIO / "zh_f2.txt").read_text(encoding="utf-8").strip()
VOICE_NOTE_LABELS = {"neutral", "happy", "sad", "angry", "anxious"}
MAX_UPLOAD_MB = 2
MAX_DURATION_S = 25  # the clips last 15-23.4 s


def _edit_distance(a: list, b: list) -> int:
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (x != y))
    return row[-1]


def wer(ref: str, hyp: str) -> float:
    """Word error rate on lowercased words without punctuation."""

    def words(s: str) -> list[str]:
        return re.sub(r"[^\w\s']", " ", s.lower()).split()

    return _edit_distance(words(ref), words(hyp)) / len(words(ref))


def cer(ref: str, hyp: str) -> float:
    """Character error rate, punctuation and spaces removed (the spec's measure)."""

    def chars(s: str) -> list[str]:
        return [c for c in s if not unicodedata.category(c).startswith(("P", "Z"))]

    return _edit_distance(chars(ref), chars(hyp)) / len(chars(ref))


@pytest.fixture(scope="module")
def speech_server(default_model_path):
    env = {
        "ALLINONE_MODEL_ID": "qwen-default",
        "ALLINONE_SPEECH": "true",
        "ALLINONE_SPEECH_MAX_UPLOAD_MB": str(MAX_UPLOAD_MB),
        "ALLINONE_SPEECH_MAX_DURATION_S": str(MAX_DURATION_S),
    }
    with ServerProcess.running(str(default_model_path), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(speech_server):
    return openai.OpenAI(base_url=f"{speech_server.url}/v1", api_key="none", max_retries=0)


def _transcribe(srv, name: str, data: bytes, **form) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/audio/transcriptions", files={"file": (name, data)}, data=form, timeout=300
    )


def _serves(srv) -> None:
    """The server still answers a transcription after whatever came before."""
    r = _transcribe(srv, "en.flac", _clip(4.0), response_format="text")
    assert r.status_code == 200 and "washing machine" in r.text.lower(), r.text


def _clip(seconds: float, fmt: str = "flac") -> bytes:
    """The first ``seconds`` of the English clip, encoded as ``fmt`` with PyAV."""
    import av

    with av.open(str(AUDIO / "en.flac")) as src:
        samples = np.concatenate([f.to_ndarray().reshape(-1) for f in src.decode(audio=0)])
    samples = samples[: int(seconds * 16000)]
    codec, container, rate = {
        "flac": ("flac", "flac", 16000),
        "wav": ("pcm_s16le", "wav", 16000),
        "mp3": ("libmp3lame", "mp3", 16000),
        "ogg": ("libopus", "ogg", 48000),  # Ogg Opus: WhatsApp and Telegram voice notes
        "m4a": ("aac", "mp4", 16000),
        "webm": ("libopus", "webm", 48000),
    }[fmt]
    out = io.BytesIO()
    with av.open(out, "w", format=container) as dst:
        stream = dst.add_stream(codec, rate=rate, layout="mono")
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = 16000
        resampler = av.AudioResampler(format=stream.format.name, layout="mono", rate=rate)
        for f in [*resampler.resample(frame), *resampler.resample(None)]:
            for packet in stream.encode(f):
                dst.mux(packet)
        for packet in stream.encode(None):
            dst.mux(packet)
    return out.getvalue()


def test_the_openai_sdk_transcribes_english_with_wer_at_most_10_percent(client):
    with open(AUDIO / "en.flac", "rb") as fh:
        result = client.audio.transcriptions.create(model="whisper-1", file=fh)
    assert wer(EN_REF, result.text) <= 0.10, result.text
    assert result.usage is not None and result.usage.seconds == 16  # 15.07 s, rounded up


def test_mandarin_comes_back_simplified_with_cer_at_most_25_percent(client):
    with open(AUDIO / "zh_f2.flac", "rb") as fh:
        result = client.audio.transcriptions.create(
            model="whisper-base", file=fh, response_format="verbose_json"
        )
    assert result.language == "chinese"  # detected, not given
    assert cer(ZH_REF, result.text) <= 0.25, result.text
    import opencc

    assert opencc.OpenCC("t2s").convert(result.text) == result.text  # no Traditional characters


def test_every_response_format_parses(client):
    data = (AUDIO / "en.flac").read_bytes()
    verbose = client.audio.transcriptions.create(
        model="whisper-1",
        file=("en.flac", data),
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
    )
    assert verbose.duration == pytest.approx(15.07, abs=0.01)
    assert verbose.segments and verbose.words
    assert all(s.start <= s.end for s in verbose.segments)
    assert [w.word.strip().lower() for w in verbose.words[:2]] == ["hello,", "i"]
    assert verbose.segments[-1].end <= verbose.duration + 0.01
    text = client.audio.transcriptions.create(
        model="whisper-1", file=("en.flac", data), response_format="text"
    )
    assert isinstance(text, str) and wer(EN_REF, text) <= 0.10
    srt = client.audio.transcriptions.create(
        model="whisper-1", file=("en.flac", data), response_format="srt"
    )
    cues = re.findall(r"(\d+)\n(\d\d:\d\d:\d\d,\d{3}) --> (\d\d:\d\d:\d\d,\d{3})\n(.+)\n", srt)
    assert [int(c[0]) for c in cues] == list(range(1, len(cues) + 1)) and len(cues) >= 2
    assert wer(EN_REF, " ".join(c[3] for c in cues)) <= 0.10
    vtt = client.audio.transcriptions.create(
        model="whisper-1", file=("en.flac", data), response_format="vtt"
    )
    assert vtt.startswith("WEBVTT\n\n")
    assert len(re.findall(r"\d\d:\d\d:\d\d\.\d{3} --> \d\d:\d\d:\d\d\.\d{3}\n", vtt)) == len(cues)


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "m4a", "webm"])
def test_each_container_format_decodes_in_process(speech_server, fmt):
    r = _transcribe(speech_server, f"note.{fmt}", _clip(5.0, fmt), response_format="json")
    assert r.status_code == 200, r.text
    assert "washing machine" in r.json()["text"].lower(), r.text


@pytest.mark.parametrize(
    ("name", "data", "form", "status", "param", "code"),
    [
        ("empty.wav", b"", {}, 400, "file", None),
        ("noise.mp3", b"this is not audio, only text " * 40, {}, 400, "file", "invalid_audio"),
        ("big.wav", b"\0" * (MAX_UPLOAD_MB * 1024 * 1024 + 10), {}, 413, None, "payload_too_large"),
        ("en.flac", None, {"stream": "true"}, 400, "stream", None),
        ("en.flac", None, {"response_format": "xml"}, 400, "response_format", None),
        ("en.flac", None, {"language": "klingon"}, 400, "language", None),
        ("en.flac", None, {"temperature": "7"}, 400, "temperature", None),
        ("en.flac", None, {"model": "whisper-large"}, 404, "model", "model_not_found"),
        ("en.flac", None, {"speed": "2"}, 400, "speed", None),
        (
            "en.flac",
            None,
            {"timestamp_granularities[]": "word"},
            400,
            "timestamp_granularities",
            None,
        ),
        ("en.flac", None, {"chunking_strategy": "auto"}, 400, "chunking_strategy", None),
    ],
    ids=[
        "empty",
        "not-audio",
        "over-size",
        "stream",
        "format",
        "language",
        "temperature",
        "model",
        "unknown-field",
        "words-without-verbose",
        "chunking",
    ],
)
def test_bad_uploads_get_envelopes_and_the_server_keeps_serving(
    speech_server, name, data, form, status, param, code
):
    data = _clip(3.0) if data is None else data
    r = _transcribe(speech_server, name, data, **form)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    if code:
        assert err["code"] == code
    assert httpx.get(f"{speech_server.url}/ready", timeout=10).status_code == 200


def test_after_the_bad_uploads_transcriptions_still_work(speech_server):
    _serves(speech_server)


def test_audio_over_the_duration_limit_is_refused_before_any_work(speech_server):
    import wave

    before = _metric(speech_server, "allinone_transcriptions_total")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:  # 30 s of near-silence, 0.96 MB
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(np.zeros(30 * 16000, dtype=np.int16).tobytes())
    r = _transcribe(speech_server, "long.wav", out.getvalue())
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "audio_too_long" and "25" in r.json()["error"]["message"]
    assert _metric(speech_server, "allinone_transcriptions_total") == before  # nothing queued


def test_the_sdk_multipart_without_a_file_and_a_json_body_are_refused(speech_server):
    r = httpx.post(
        f"{speech_server.url}/v1/audio/transcriptions", data={"model": "whisper-1"}, timeout=30
    )
    assert r.status_code == 400 and r.json()["error"]["param"] in ("file", None), r.text
    r = httpx.post(f"{speech_server.url}/v1/audio/transcriptions", json={"file": "x"}, timeout=30)
    assert r.status_code == 400 and "multipart" in r.json()["error"]["message"], r.text


def _metric(srv, name: str) -> float:
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name) and not line.startswith("#")
    )


def _speech_idle(srv, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = httpx.get(f"{srv.url}/ready", timeout=10).json()["engine"]
        if stats["speech_active"] == 0 and stats["speech_queue_depth"] == 0:
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the speech worker still holds work: {stats}")


def test_a_client_that_hangs_up_cancels_its_transcription(speech_server):
    _speech_idle(speech_server)
    cancelled = 'allinone_transcriptions_total{outcome="cancelled"}'
    before = _metric(speech_server, cancelled)
    data = (AUDIO / "zh_f2.flac").read_bytes()
    for _ in range(2):  # the second waits in the queue behind the first
        with pytest.raises(httpx.TimeoutException):
            httpx.post(
                f"{speech_server.url}/v1/audio/transcriptions",
                files={"file": ("zh.flac", data)},
                timeout=0.5,
            )
    _speech_idle(speech_server)
    assert _metric(speech_server, cancelled) - before == 2
    _serves(speech_server)


def test_the_request_timeout_answers_504_and_cancels_the_transcription(tiny_server):
    srv = tiny_server(ALLINONE_SPEECH="true", ALLINONE_REQUEST_TIMEOUT_S="1")
    r = _transcribe(srv, "zh.flac", (AUDIO / "zh_f2.flac").read_bytes())
    assert r.status_code == 504 and r.json()["error"]["code"] == "timeout", r.text
    _speech_idle(srv)
    assert _metric(srv, 'allinone_transcriptions_total{outcome="cancelled"}') == 1


def _summary(srv, clip: str, **form) -> httpx.Response:
    return httpx.post(
        f"{srv.url}/v1/audio/summaries",
        files={"file": (clip, (AUDIO / clip).read_bytes())},
        data=form,
        timeout=300,
    )


def test_the_voice_note_pipeline_returns_transcript_summary_and_emotion(speech_server):
    for clip, language in (("en.flac", "en"), ("zh_f2.flac", "zh")):
        r = _summary(speech_server, clip)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["transcript"]["language"] == language and body["transcript"]["text"]
        assert body["output"]["emotion"] in VOICE_NOTE_LABELS
        assert body["output"]["summary"]
        probs = body["scores"]["emotion"]
        assert set(probs) == VOICE_NOTE_LABELS and sum(probs.values()) == pytest.approx(1.0)
        assert max(probs, key=probs.get) == body["output"]["emotion"]
        assert body["usage"]["audio_seconds"] > 10 and body["timings_ms"]["total"] > 0
    r = _summary(speech_server, "en.flac", task="sentiment")
    assert r.status_code == 400 and r.json()["error"]["param"] == "task", r.text


def test_the_english_voice_note_is_heard_as_angry(speech_server):
    # it says "I am very angry" and threatens a complaint
    r = _summary(speech_server, "en.flac", language="en")
    assert r.status_code == 200 and r.json()["output"]["emotion"] == "angry", r.text


def test_metrics_count_audio_seconds_and_real_time_factor(speech_server):
    text = httpx.get(f"{speech_server.url}/metrics", timeout=10).text
    assert _metric(speech_server, "allinone_audio_seconds_total") > 15
    assert "allinone_transcription_rtf_bucket" in text


def test_a_server_without_speech_answers_501_and_never_loads_the_speech_engine(tiny_server):
    srv = tiny_server()
    r = httpx.post(
        f"{srv.url}/v1/audio/transcriptions", files={"file": ("a.flac", b"x")}, timeout=30
    )
    assert r.status_code == 501 and r.json()["error"]["code"] == "not_enabled", r.text
    assert "--speech" in r.json()["error"]["message"]
    maps = Path(f"/proc/{srv.pid}/maps").read_text()
    assert "ctranslate2" not in maps and "onnxruntime" not in maps


def test_tiny_en_transcribes_english(tmp_path):
    from allinone.models.speech import WHISPER_TINY_EN, fetch_speech
    from allinone.speech.audio import decode
    from allinone.speech.transcriber import TranscribeOptions, Transcriber

    model = Transcriber(fetch_speech(WHISPER_TINY_EN), WHISPER_TINY_EN.name, multilingual=False)
    audio = decode((AUDIO / "en.flac").read_bytes(), 60)
    result = model.transcribe(audio.samples, TranscribeOptions())
    assert result.language == "en" and wer(EN_REF, result.text) <= 0.10, result.text


def test_allinone_listen_prints_transcript_and_the_task_answer(tiny_model_path):
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "allinone",
            "listen",
            str(AUDIO / "en.flac"),
            "--json",
            "--model",
            str(tiny_model_path),
            "--threads",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    body = json.loads(out.stdout)
    assert wer(EN_REF, body["transcript"]["text"]) <= 0.10
    assert body["task"] == "voice-note" and body["output"]["emotion"] in VOICE_NOTE_LABELS
    assert set(body["scores"]["emotion"]) == VOICE_NOTE_LABELS
