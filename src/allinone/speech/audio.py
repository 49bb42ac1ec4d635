"""Audio files to 16 kHz mono float32 samples, in process (PyAV's bundled FFmpeg: wav, mp3, m4a,
ogg, flac, webm ...), with the duration limit enforced while decoding.

faster-whisper's own ``decode_audio`` decodes the whole file before anyone can look at its length;
a 25 MB upload of low-bitrate speech is hours of audio (~230 MB of float32 an hour), so this
decoder reads the container's declared duration first and stops as soon as the samples pass the
limit, whatever the header said.
"""

from __future__ import annotations

import gc
import io
from dataclasses import dataclass

import numpy as np

from allinone.serving.errors import InputError

SAMPLE_RATE = 16_000  # Whisper's input rate (Hz)


class AudioError(InputError):
    """The upload (field ``file``) is not audio we can decode (``invalid_audio``), or is longer
    than the limit (``audio_too_long``); the message says which."""

    def __init__(self, message: str, too_long: bool = False) -> None:
        super().__init__(message, "file", code="audio_too_long" if too_long else "invalid_audio")
        self.too_long = too_long


@dataclass(frozen=True)
class Audio:
    """Decoded audio: ``samples`` float32 in [-1, 1], shape (n,), at ``SAMPLE_RATE``."""

    samples: np.ndarray
    container: str

    @property
    def duration(self) -> float:
        """Seconds of audio."""
        return len(self.samples) / SAMPLE_RATE


def probe_duration(data: bytes) -> float | None:
    """The duration (seconds) the container declares, or None when it declares none. Reads the
    header only. AudioError when the bytes are not a container FFmpeg can open."""
    import av

    if not data:
        raise AudioError("the file is empty (0 bytes): send an audio file")
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            stream = container.streams.audio[0]
            if stream.duration is not None and stream.time_base is not None:
                return float(stream.duration * stream.time_base)
            if container.duration is not None:
                return container.duration / 1_000_000  # av.time_base: microseconds
            return None
    except av.FFmpegError as exc:
        raise AudioError(
            f"the file is not audio that can be decoded ({exc.strerror or exc}); send wav, mp3, "
            "m4a, ogg, flac or webm"
        ) from exc


def check_duration(data: bytes, max_seconds: float) -> float | None:
    """Refuse, before any decoding, a file that is not audio or whose header declares more than
    ``max_seconds`` (AudioError, ``too_long`` for the latter); the declared duration or None.
    ``decode`` enforces the limit again on the samples, whatever the header said."""
    declared = probe_duration(data)
    if declared is not None and declared > max_seconds:
        raise AudioError(
            f"the audio lasts {declared:.1f} s; at most {max_seconds:g} s is accepted "
            "(ALLINONE_SPEECH_MAX_DURATION_S): send a shorter file",
            too_long=True,
        )
    return declared


def decode(data: bytes, max_seconds: float) -> Audio:
    """Decode ``data`` to 16 kHz mono. AudioError (``too_long``) once the audio passes
    ``max_seconds``, or when it is not decodable audio, or when it holds no samples."""
    import av

    max_samples = int(max_seconds * SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r", metadata_errors="ignore") as container:
            if not container.streams.audio:
                raise AudioError("the file has no audio stream")
            fmt = container.format.name
            resampler = av.AudioResampler(format="s16", layout="mono", rate=SAMPLE_RATE)
            for frame in _frames(container):
                for out in resampler.resample(frame):
                    chunk = out.to_ndarray().reshape(-1)
                    total += len(chunk)
                    if total > max_samples:
                        raise AudioError(
                            f"the audio is longer than {max_seconds:g} s "
                            "(ALLINONE_SPEECH_MAX_DURATION_S); send a shorter file",
                            too_long=True,
                        )
                    chunks.append(chunk)
            for out in resampler.resample(None):  # flush
                chunks.append(out.to_ndarray().reshape(-1))
            del resampler
    except av.FFmpegError as exc:
        raise AudioError(
            f"the file is not audio that can be decoded ({exc.strerror or exc}); send wav, mp3, "
            "m4a, ogg, flac or webm"
        ) from exc
    finally:
        # PyAV's resampler graphs are only freed by a collection (faster-whisper issue 390).
        gc.collect()
    if not chunks or sum(len(c) for c in chunks) == 0:
        raise AudioError("the file decodes to no audio samples")
    samples = np.concatenate(chunks).astype(np.float32) / 32768.0
    return Audio(samples=samples, container=fmt)


def _frames(container):
    """Audio frames of the first audio stream; a corrupt frame in the middle is skipped (as
    faster-whisper does), a file with none readable fails in ``decode``."""
    import av

    frames = container.decode(audio=0)
    while True:
        try:
            yield next(frames)
        except StopIteration:
            return
        except av.error.InvalidDataError:
            continue
