"""The speech worker: one thread that decodes and transcribes uploads one at a time.

Why one at a time: Whisper and the LLM share the same few cores; two transcriptions at once
would each take twice as long and slow every chat meanwhile (the spec measured one CTranslate2
thread as fast as two under contention). Waiting transcriptions count against the engine's
``max_queue`` together with the LLM's waiting requests (a full queue is a 503, as for chat), and
a waiting or running transcription whose caller goes away (disconnect, timeout, drain) is
cancelled: before it starts, or after the segment being decoded (<= 30 s of audio).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from allinone.backends.base import EngineOverloadedError
from allinone.speech.audio import decode
from allinone.speech.transcriber import (
    TranscribeOptions,
    Transcriber,
    Transcript,
    TranscriptionCancelled,
)

log = logging.getLogger(__name__)


@dataclass
class SpeechJob:
    """One upload to decode and transcribe; ``future`` gets the Transcript or the error."""

    data: bytes
    options: TranscribeOptions
    max_seconds: float
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class SpeechWorker:
    """Runs SpeechJobs on one thread. ``max_queue``: most jobs waiting, together with
    ``other_waiting()`` (the LLM engine's queue depth); ``metrics``: a Metrics to update."""

    def __init__(
        self,
        transcriber: Transcriber,
        max_queue: int,
        metrics: Any = None,
        other_waiting: Callable[[], int] = lambda: 0,
    ) -> None:
        self.transcriber = transcriber
        self.max_queue = max_queue
        self.metrics = metrics
        self.other_waiting = other_waiting
        self._jobs: queue.Queue[SpeechJob | None] = queue.Queue()
        self._running: SpeechJob | None = None
        self._thread = threading.Thread(target=self._loop, name="allinone-speech", daemon=True)
        self._thread.start()

    @property
    def waiting(self) -> int:
        """Jobs queued and not started."""
        return self._jobs.qsize()

    @property
    def busy(self) -> bool:
        """True while a job runs."""
        return self._running is not None

    def submit(
        self,
        data: bytes,
        options: TranscribeOptions,
        max_seconds: float,
    ) -> SpeechJob:
        """Queue an upload; EngineOverloadedError when the shared queue is full."""
        if self.waiting + self.other_waiting() >= self.max_queue:
            raise EngineOverloadedError(
                f"the wait queue is full ({self.max_queue} requests, transcriptions and chats "
                "together); retry later"
            )
        job = SpeechJob(data, options, max_seconds)
        self._jobs.put(job)
        self._gauge()
        return job

    async def result(self, job: SpeechJob) -> Transcript:
        """Await ``job``; if the awaiting task is cancelled, so is the job."""
        try:
            return await asyncio.wrap_future(job.future)
        finally:
            job.cancelled.set()  # no-op once it finished

    def stats(self) -> dict[str, Any]:
        """Waiting and running jobs, for health and metrics."""
        return {"speech_queue_depth": self.waiting, "speech_active": int(self.busy)}

    def close(self) -> None:
        """Stop after the running job; jobs still waiting fail."""
        self._jobs.put(None)

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.speech_queue.set(self.waiting)

    def _count(self, outcome: str, transcript: Transcript | None = None) -> None:
        if self.metrics is None:
            return
        self.metrics.transcriptions.labels(outcome).inc()
        if transcript is not None:
            self.metrics.audio_seconds.inc(transcript.duration)
            self.metrics.transcription_rtf.observe(transcript.rtf)

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            self._gauge()
            if job is None:
                break
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                job.future.cancel()  # its caller is gone (a no-op if already cancelled)
                self._count("cancelled")
                continue
            self._running = job
            try:
                audio = decode(job.data, job.max_seconds)
                job.data = b""  # the upload is no longer needed while Whisper runs
                result = self.transcriber.transcribe(
                    audio.samples, job.options, job.cancelled.is_set
                )
            except TranscriptionCancelled as exc:
                self._count("cancelled")
                job.future.set_exception(exc)
            except Exception as exc:  # the job fails alone; the worker goes on
                if not isinstance(exc, ValueError):
                    log.exception("transcription failed")
                self._count("error")
                job.future.set_exception(exc)
            else:
                self._count("ok", result)
                job.future.set_result(result)
            finally:
                self._running = None
        while True:  # closing: fail what still waits
            try:
                left = self._jobs.get_nowait()
            except queue.Empty:
                return
            if left is not None and left.future.set_running_or_notify_cancel():
                left.future.set_exception(TranscriptionCancelled("the server is shutting down"))
