"""Speech in: real-time factor, memory and the voice-note pipeline, side by side in one run.

0. Whisper in this process, nothing else running: RTF with 1 and 2 CTranslate2 threads, and
   each clip's accuracy (WER / CER against tests/data/audio/*.txt).
Then one server process at a time, the default LLM, same threads:
1. Memory (RSS and peak VmHWM): the server without --speech after load and after 30 s of 4 chats;
   then with it, after load, after the transcriptions, and after the chats as well, so the speech
   model's cost is the difference at the same point.
2. Real-time factor (transcription time / audio seconds, server side) of Whisper alone on the
   committed clips (English 15.1 s, Mandarin 23.4 s, English 20.5 s), median of ``--rounds``.
3. The same while 4 chats generate (streamed, 200-token replies, sent back to back), and the chats'
   tokens/s with and without a transcription running.
4. The voice-note pipeline (``/v1/audio/summaries``: transcribe, then emotion + summary) on the
   20.5 s clip, alone and while 4 chats generate: end-to-end latency.

Usage: .venv/bin/python benchmarks/bench_speech.py [--rounds 3] [--speech-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from allinone.models import ensure_model
from allinone.server_process import ServerProcess
from common import ROOT, machine, write_result

AUDIO = ROOT / "tests" / "data" / "audio"
CLIPS = ("en.flac", "zh_f2.flac", "en_20s.flac")
CHAT = {
    "model": "default",
    "max_tokens": 200,
    "temperature": 0.7,
    "stream": True,
    "stream_options": {"include_usage": True},
}


def memory(pid: int) -> dict[str, float]:
    """RSS now and its peak (VmHWM), MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return {"rss_mb": round(fields["VmRSS"], 1), "peak_mb": round(fields["VmHWM"], 1)}


class ChatLoad:
    """``n`` clients each streaming chats back to back until stopped; counts tokens."""

    def __init__(self, url: str, model: str, n: int = 4) -> None:
        self.url, self.model, self.n = url, model, n
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,)) for i in range(n)]

    def _run(self, i: int) -> None:
        k = 0
        with httpx.Client(timeout=600) as client:
            while not self.stop.is_set():
                k += 1
                body = {
                    **CHAT,
                    "model": self.model,
                    "messages": [
                        {
                            "role": "user",
                            "content": f"[{i}.{k}] Write a long story about a lighthouse.",
                        }
                    ],
                }
                with client.stream("POST", f"{self.url}/v1/chat/completions", json=body) as r:
                    for _ in r.iter_lines():
                        if self.stop.is_set():
                            break

    @property
    def tokens(self) -> float:
        """Tokens the engine generated so far (its counter, exact)."""
        for line in httpx.get(f"{self.url}/metrics", timeout=30).text.splitlines():
            if line.startswith("allinone_engine_generated_tokens_total "):
                return float(line.split()[1])
        raise RuntimeError("no generated-tokens counter in /metrics")

    def rate(self, seconds: float) -> float:
        """Tokens/s over the next ``seconds``."""
        t0, n0 = time.perf_counter(), self.tokens
        time.sleep(seconds)
        return (self.tokens - n0) / (time.perf_counter() - t0)

    def __enter__(self) -> ChatLoad:
        for t in self.threads:
            t.start()
        time.sleep(3)  # prompts evaluated, all four decoding
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join()


def transcribe(url: str, clip: str) -> dict:
    data = (AUDIO / clip).read_bytes()
    t0 = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/audio/transcriptions",
        files={"file": (clip, data)},
        data={"response_format": "verbose_json"},
        timeout=900,
    )
    r.raise_for_status()
    wall = time.perf_counter() - t0
    return {"rtf": float(r.headers["x-rtf"]), "wall_s": wall, "duration": r.json()["duration"]}


def summary(url: str, clip: str) -> dict:
    t0 = time.perf_counter()
    r = httpx.post(
        f"{url}/v1/audio/summaries",
        files={"file": (clip, (AUDIO / clip).read_bytes())},
        timeout=900,
    )
    r.raise_for_status()
    body = r.json()
    return {
        "latency_s": time.perf_counter() - t0,
        "transcription_s": body["timings_ms"]["transcription"] / 1000,
        "task_s": body["timings_ms"]["task"] / 1000,
        "emotion": body["output"]["emotion"],
    }


def med(rows: list[dict], key: str) -> float:
    return round(statistics.median(r[key] for r in rows), 3)


def in_process(rounds: int, speech_model: str) -> dict:
    """RTF alone at 1 and 2 threads, and accuracy, with no server."""
    sys.path.insert(0, str(ROOT / "tests" / "integration"))
    from test_speech import cer, wer

    from allinone.models.speech import fetch_speech, get_speech_entry
    from allinone.speech.audio import decode
    from allinone.speech.transcriber import TranscribeOptions, Transcriber

    entry = get_speech_entry(speech_model)
    assert entry is not None
    refs = {
        "en": (AUDIO / "en.txt").read_text().strip(),
        "zh": (AUDIO / "zh_f2.txt").read_text().strip(),
    }
    out: dict = {}
    for threads in (1, 2):
        model = Transcriber(fetch_speech(entry), entry.name, entry.multilingual, threads=threads)
        model.transcribe(decode((AUDIO / "en.flac").read_bytes(), 600).samples, TranscribeOptions())
        for clip in CLIPS:
            if not entry.multilingual and clip.startswith("zh"):
                continue
            samples = decode((AUDIO / clip).read_bytes(), 600).samples
            runs = [model.transcribe(samples, TranscribeOptions()) for _ in range(rounds)]
            ref = refs["zh" if clip.startswith("zh") else "en"]
            err = cer(ref, runs[0].text) if clip.startswith("zh") else wer(ref, runs[0].text)
            out[f"{clip} threads={threads}"] = {
                "rtf": round(statistics.median(r.rtf for r in runs), 3),
                "error_rate": round(err, 3),
                "text": runs[0].text,
            }
            print(f"in process, {clip}, {threads} thread(s): {out[f'{clip} threads={threads}']}")
        del model
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="LLM threads (2)")
    ap.add_argument("--speech-threads", type=int, default=1, help="Whisper threads (1)")
    ap.add_argument("--speech-model", default="whisper-base")
    args = ap.parse_args()
    model = str(ensure_model("default"))
    env = {"ALLINONE_THREADS": str(args.threads), "ALLINONE_MODEL_ID": "default"}
    result: dict = {"machine": machine(), "args": vars(args)}
    result["in_process"] = in_process(args.rounds, args.speech_model)

    with ServerProcess.running(model, env) as srv:
        result["memory_without_speech_loaded"] = memory(srv.pid)
        with ChatLoad(srv.url, "default") as load:
            result["chat_tok_s_without_speech"] = round(load.rate(30), 2)
        result["memory_without_speech_after_chats"] = memory(srv.pid)
    print(
        f"memory without speech: loaded {result['memory_without_speech_loaded']}, after 30 s "
        f"of 4 chats {result['memory_without_speech_after_chats']}"
    )

    speech_env = {
        **env,
        "ALLINONE_SPEECH": "true",
        "ALLINONE_SPEECH_THREADS": str(args.speech_threads),
        "ALLINONE_SPEECH_MODEL": args.speech_model,
        "ALLINONE_REQUEST_TIMEOUT_S": "900",
    }
    with ServerProcess.running(model, speech_env) as srv:
        result["memory_with_speech_loaded"] = memory(srv.pid)
        transcribe(srv.url, "en.flac")  # warm-up (first call builds CTranslate2's caches)
        alone = {c: [transcribe(srv.url, c) for _ in range(args.rounds)] for c in CLIPS}
        result["rtf_alone"] = {c: med(rows, "rtf") for c, rows in alone.items()}
        result["memory_with_speech_after_transcriptions"] = memory(srv.pid)
        print(f"RTF alone: {result['rtf_alone']}")
        result["pipeline_alone"] = [summary(srv.url, "en_20s.flac") for _ in range(args.rounds)]
        print(f"pipeline alone (20.5 s clip): {med(result['pipeline_alone'], 'latency_s')} s")
        with ChatLoad(srv.url, "default") as load:
            result["chat_tok_s_alone"] = round(load.rate(15), 2)
            busy: dict[str, list[dict]] = {c: [] for c in CLIPS}
            rates = []
            for _ in range(args.rounds):
                for c in CLIPS:
                    t0, n0 = time.perf_counter(), load.tokens
                    busy[c].append(transcribe(srv.url, c))
                    rates.append((load.tokens - n0) / (time.perf_counter() - t0))
            result["rtf_with_4_chats"] = {c: med(rows, "rtf") for c, rows in busy.items()}
            result["chat_tok_s_during_transcription"] = round(statistics.median(rates), 2)
            result["pipeline_with_4_chats"] = [
                summary(srv.url, "en_20s.flac") for _ in range(args.rounds)
            ]
        print(f"RTF with 4 chats: {result['rtf_with_4_chats']}")
        print(
            f"4 chats: {result['chat_tok_s_alone']} tok/s alone, "
            f"{result['chat_tok_s_during_transcription']} tok/s while transcribing"
        )
        print(
            f"pipeline with 4 chats (20.5 s clip): "
            f"{med(result['pipeline_with_4_chats'], 'latency_s')} s"
        )
        result["memory_with_speech_after"] = memory(srv.pid)
    print(
        f"memory with speech: loaded {result['memory_with_speech_loaded']}, after the "
        f"transcriptions {result['memory_with_speech_after_transcriptions']}, after the "
        f"chats too {result['memory_with_speech_after']}"
    )
    print(f"wrote {write_result('bench_speech', result)}")


if __name__ == "__main__":
    main()
