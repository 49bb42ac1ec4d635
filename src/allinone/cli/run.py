"""The commands that load the model in this process and answer one job: classify, extract,
decide, chat, and listen (speech, then an extract task)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allinone.cli.common import FlagGroups, add_command, load_settings, open_service


def cmd_classify(args: argparse.Namespace) -> int:
    texts = args.text
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    settings = load_settings(args)
    service = open_service(settings, use_calibration=not args.no_calibration)
    try:
        service.classify_task(args.task)
        results = service.classify(args.task, texts)
    finally:
        service.backend.close()
    for r in results:
        plain = r.label if r.category is None else f"{r.label} ({r.category})"
        print(json.dumps(r.to_dict(), ensure_ascii=False) if args.json else plain)
    return 0


def cmd_listen(args: argparse.Namespace) -> int:
    """Transcribe an audio file, then (unless --transcript-only) run an extract task on it;
    ``--json`` prints the same object as ``POST /v1/audio/summaries`` (serving.speech)."""
    import time

    from tqdm import tqdm

    from allinone.runtime import make_transcriber
    from allinone.serving.speech import require_speech, voice_note, voice_note_task
    from allinone.speech.audio import AudioError, check_duration, decode
    from allinone.speech.transcriber import TranscribeOptions
    from allinone.tasks import TaskRegistry

    t0 = time.perf_counter()
    settings = load_settings(args)
    task = voice_note_task(TaskRegistry.load(settings.server.tasks_dir), args.task)
    data = args.file.read_bytes()
    limit = settings.speech.speech_max_duration_s
    try:
        check_duration(data, limit)
        audio = decode(data, limit)
    except AudioError as exc:
        raise ValueError(f"{args.file}: {exc}") from exc
    transcriber = make_transcriber(settings)
    show = args.progress or sys.stderr.isatty()
    with tqdm(
        total=round(audio.duration, 1), unit="s", desc="transcribing", disable=not show
    ) as bar:

        def progress(done: float) -> None:
            bar.update(round(done, 1) - bar.n)

        transcript = transcriber.transcribe(
            audio.samples,
            TranscribeOptions(language=args.language, prompt=args.prompt),
            on_progress=progress,
        )
    heard = time.perf_counter()
    result, model = None, settings.model.model
    if not args.transcript_only and transcript.text.strip():
        service = open_service(settings)
        try:
            result = service.extract(task.name, require_speech(transcript))
            model = service.backend.model_id
        finally:
            service.backend.close()
    done = time.perf_counter()
    timings = {"transcription": heard - t0, "task": done - heard, "total": done - t0}
    out = voice_note(
        task.name,
        model,
        transcriber.name,
        transcript,
        result,
        {k: v * 1000 for k, v in timings.items()},
    )
    if args.json:
        print(json.dumps(out, ensure_ascii=False, indent=2))
        return 0
    print(f"[{transcript.language}, {transcript.duration:.1f} s, RTF {transcript.rtf:.2f}]")
    print(transcript.text)
    for key, value in out.get("output", {}).items():
        probs = out["scores"].get(key)
        top = "" if not probs else f"  (p={probs[value]:.2f})"
        print(f"{key}: {value}{top}")
    return 0


def _decide_questions(args: argparse.Namespace, tasks) -> tuple[list, list[str]]:
    """(Questions, their names) from --task, --questions FILE and the per-question flags."""
    import tomllib

    from allinone.decisions import task_questions
    from allinone.serving.errors import InputError
    from allinone.tasks.spec import TaskQuestion

    specs: list[TaskQuestion] = []
    if args.task:
        task = tasks.get(args.task)
        if task.kind != "decide":
            raise InputError(f"task {args.task!r} is a {task.kind} task, not a decide task")
        specs += task.questions
    if args.questions:
        raw = args.questions.read_text(encoding="utf-8")
        data = tomllib.loads(raw) if args.questions.suffix == ".toml" else json.loads(raw)
        items = data.get("questions", []) if isinstance(data, dict) else data
        specs += [TaskQuestion.model_validate(q) for q in items]
    for kind, flags in (("predicate", args.predicate), ("choice", args.choice)):
        for k, flag in enumerate(flags or []):
            name = f"{kind}{k + 1}"
            if kind == "predicate":
                specs.append(TaskQuestion(name=name, type=kind, instructions=flag))
            else:
                question, _, options = flag.partition("=")
                specs.append(
                    TaskQuestion(
                        name=name, type=kind, instructions=question, choices=options.split("|")
                    )
                )
    for k, flag in enumerate(args.score or []):
        question, _, levels = flag.partition("=")
        specs.append(
            TaskQuestion(
                name=f"score{k + 1}", type="score", instructions=question, levels=levels.split("|")
            )
        )
    if not specs:
        raise InputError(
            "no questions: give --task, --questions FILE or --predicate/--choice/--score"
        )

    class _Spec:  # task_questions reads .questions
        questions = specs

    return task_questions(_Spec), [q.name for q in specs]


def cmd_decide(args: argparse.Namespace) -> int:
    from allinone.decisions import DecisionService, Strategy, openai_answer
    from allinone.serving.errors import InputError

    try:
        strategy = Strategy.parse(args.strategy) if args.strategy else None
    except InputError as exc:
        raise SystemExit(f"error: --strategy: {exc}") from None
    text = args.input
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    settings = load_settings(args)
    service = open_service(settings)
    try:
        questions, names = _decide_questions(args, service.tasks)
        result = DecisionService(service, strategy).decide(text, questions)
    finally:
        service.backend.close()
    answers = {n: openai_answer(n, a) for n, a in zip(names, result.answers, strict=True)}
    if args.json:
        out = {
            "answers": answers,
            "usage": {"input_tokens": result.input_tokens, "cached_tokens": result.cached_tokens},
            "latency_ms": round(result.latency_ms, 2),
        }
        print(json.dumps(out, ensure_ascii=False))
        return 0
    for name, a in answers.items():
        if a["type"] == "predicate":
            print(
                f"{name}: {'yes' if a['probability'] >= 0.5 else 'no'} "
                f"(P(true)={a['probability']:.3f})"
            )
        elif a["type"] == "choice":
            p = max(x["probability"] for x in a["probabilities"])
            print(f"{name}: {a['choice']} (p={p:.3f}, confidence={a['confidence']:.2f})")
        else:
            top = max(a["probabilities"], key=lambda x: x["probability"])
            print(
                f"{name}: {top['label']} (score={a['score']:.2f} of "
                f"{len(a['probabilities']) - 1}, confidence={a['confidence']:.2f})"
            )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    service = open_service(settings)
    try:
        texts = [sys.stdin.read()] if args.text == ["-"] else args.text
        for text in texts:
            r = service.extract(args.task, text)
            print(json.dumps(r.to_dict() if args.json else r.output, ensure_ascii=False))
    finally:
        service.backend.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    settings = load_settings(args)
    service = open_service(settings)
    task = service.tasks.get(args.task)
    if task.kind != "chat":
        print(
            f"task {task.name!r} is a {task.kind} task; use: allinone {task.kind}", file=sys.stderr
        )
        return 2
    history: list[dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    print(
        f"allinone chat ({service.backend.model_id}, task {task.name}); Ctrl-D or Ctrl-C to quit.",
        file=sys.stderr,
    )
    handle = None
    try:
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stderr)
                return 0
            if not line.strip():
                continue
            history.append({"role": "user", "content": line})
            plan = service.plan_chat(task, history)
            # Keep only what the budget kept, so a long session does not grow without bound.
            if plan.dropped_messages:
                turns = [m for m in history if m["role"] != "system"]
                drop = {id(m) for m in turns[: plan.dropped_messages]}
                history = [m for m in history if id(m) not in drop]
            (handle,) = service.submit_chat(plan)
            reply = []
            for kind, value in handle.events():
                if kind == "text":
                    reply.append(value)
                    print(value, end="", flush=True)
            print()
            handle = None
            history.append({"role": "assistant", "content": "".join(reply)})
    except KeyboardInterrupt:
        if handle is not None:
            handle.cancel()
        print(file=sys.stderr)
        return 0
    finally:
        service.backend.close()


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """classify, extract, decide, chat: model and engine flags; listen: speech flags too."""
    c = add_command(sub, "classify", cmd_classify, "classify text(s); '-' reads stdin", flags.llm)
    c.add_argument("text", nargs="+", help="text(s) to classify, or '-' for one per stdin line")
    c.add_argument("--task", default="sentiment", help="classify task")
    c.add_argument("--json", action="store_true", help="print one JSON object per text")
    c.add_argument("--no-calibration", action="store_true", help="ignore a stored calibration")

    x = add_command(
        sub,
        "extract",
        cmd_extract,
        "answer an extract task (e.g. summarize) as JSON; '-' reads stdin",
        flags.llm,
    )
    x.add_argument("text", nargs="+", help="text(s), or '-' for all of stdin as one text")
    x.add_argument("--task", default="summarize", help="extract task")
    x.add_argument("--json", action="store_true", help="include task name and latency")

    dc = add_command(
        sub,
        "decide",
        cmd_decide,
        "answer several questions about one input at once (predicate, choice, score)",
        flags.llm,
    )
    dc.add_argument("input", help="the input text, '-' for stdin, or @FILE")
    dc.add_argument("--task", help="a decide task (its named questions)")
    dc.add_argument("--strategy", help="how answers are read (default: the server's)")
    dc.add_argument(
        "--questions", type=Path, help="JSON or TOML file of questions (task-file schema)"
    )
    dc.add_argument("--predicate", action="append", help="a statement to judge; may repeat")
    dc.add_argument("--choice", action="append", help="'question=opt1|opt2|...'; may repeat")
    dc.add_argument("--score", action="append", help="'question=low|...|high'; may repeat")
    dc.add_argument("--json", action="store_true", help="print one JSON object")

    ch = add_command(sub, "chat", cmd_chat, "interactive terminal chat", flags.llm)
    ch.add_argument("--task", default="chat", help="chat task")
    ch.add_argument("--system", help="system prompt instead of the task's")

    ls = add_command(
        sub,
        "listen",
        cmd_listen,
        "transcribe an audio file, then run an extract task (voice-note) on the transcript",
        [*flags.llm, flags.speech],
    )
    ls.add_argument("file", type=Path, help="audio file (wav, mp3, m4a, ogg, flac, webm)")
    ls.add_argument("--task", default="voice-note", help="extract task")
    ls.add_argument("--language", help="ISO 639-1 code (default: detect among --speech-languages)")
    ls.add_argument("--prompt", help="text to steer the transcription (names, spellings)")
    ls.add_argument("--transcript-only", action="store_true", help="skip the task (no LLM)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
