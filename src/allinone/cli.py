"""Command-line interface: one command per job: serve, classify, decide, extract, chat, eval,
calibrate, soak, listen, plan, deploy, tasks, models, doctor. Every setting is also a flag (see
settings_flags)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from allinone import __version__
from allinone.settings import (
    EngineSettings,
    ModelSettings,
    ServerSettings,
    Settings,
    SpeechSettings,
)
from allinone.settings_flags import add_settings_flags


def _settings(args: argparse.Namespace) -> Settings:
    """Flags override env/.env, which override defaults (flags: allinone.settings_flags)."""
    from allinone.settings_flags import settings_from_flags

    return Settings(
        model=settings_from_flags(args, ModelSettings),
        engine=settings_from_flags(args, EngineSettings),
        server=settings_from_flags(args, ServerSettings, tasks_dir=args.tasks_dir or None),
        speech=settings_from_flags(args, SpeechSettings),
    )


def _service(settings: Settings, use_calibration: bool = True):
    from allinone.runtime import decision_strategy_for, make_backend
    from allinone.service import TaskService
    from allinone.tasks import TaskRegistry

    tasks = TaskRegistry.load(settings.server.tasks_dir)
    backend = make_backend(settings)
    backend.load()
    service = TaskService(
        backend, tasks, settings.server.default_max_tokens, decision_strategy_for(settings)
    )
    if use_calibration:
        service.load_calibrations(settings.model.cache_dir)
    return service


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from allinone.api import create_app
    from allinone.api.http_protocol import HttpLimits, http_protocol
    from allinone.observability.logs import configure_json_logging

    settings = _settings(args)
    app = create_app(settings)
    state = app.state.server

    class DrainingServer(uvicorn.Server):
        """On SIGTERM/SIGINT: refuse new work and fail /ready at once, let requests in flight
        finish up to the drain timeout, end the rest cleanly (503 envelope, or a stream's error
        event and [DONE]), then exit 0."""

        def handle_exit(self, sig, frame) -> None:
            state.begin_drain()
            super().handle_exit(sig, frame)

    # httptools with the limits uvicorn lacks: header size and count (431), the time to send
    # the headers and the pauses in a body (408).
    protocol = http_protocol(
        HttpLimits.from_settings(settings.server),
        on_refuse=lambda reason: state.metrics.rejected.labels(reason).inc(),
    )
    config = uvicorn.Config(
        app,
        host=settings.server.host,
        port=settings.server.port,
        http=protocol,
        log_level=settings.server.log_level,
        log_config=None,
        # Past our own drain deadline requests end themselves with a clean error; uvicorn's hard
        # cut comes later, only for a connection that still will not close.
        timeout_graceful_shutdown=int(settings.server.drain_timeout_s) + 5,
    )
    configure_json_logging(settings.server.log_level)
    # After a graceful shutdown uvicorn re-raises the signal it caught, under the handler that
    # was there before it started: make that a clean exit, which is what a drain is.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server = DrainingServer(config)

    def fatal(message: str) -> None:
        logging.getLogger("allinone.serve").error("cannot serve, exiting: %s", message)
        server.should_exit = True  # uvicorn's main loop polls this flag

    state.on_fatal = fatal
    server.run()
    if state.fatal_error:
        print(f"allinone serve: {state.fatal_error}", file=sys.stderr)
        return 1
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    texts = args.text
    if texts == ["-"]:
        texts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    settings = _settings(args)
    service = _service(settings, use_calibration=not args.no_calibration)
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
    """Transcribe an audio file, then (unless --transcript-only) run an extract task on it."""
    from tqdm import tqdm

    from allinone.runtime import make_transcriber
    from allinone.speech.audio import AudioError, check_duration, decode
    from allinone.speech.transcriber import TranscribeOptions

    settings = _settings(args)
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
    out: dict[str, Any] = {
        "transcript": {
            "text": transcript.text,
            "language": transcript.language,
            "duration": round(transcript.duration, 3),
        },
        "rtf": round(transcript.rtf, 3),
    }
    if not args.transcript_only and transcript.text.strip():
        service = _service(settings)
        try:
            result = service.extract(args.task, transcript.text)
        finally:
            service.backend.close()
        out.update(task=result.task, output=result.output, scores=result.scores)
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
    from allinone.tasks import TaskError
    from allinone.tasks.spec import TaskQuestion

    specs: list[TaskQuestion] = []
    if args.task:
        task = tasks.get(args.task)
        if task.kind != "decide":
            raise TaskError(f"task {args.task!r} is a {task.kind} task, not a decide task")
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
        raise TaskError(
            "no questions: give --task, --questions FILE or --predicate/--choice/--score"
        )

    class _Spec:  # task_questions reads .questions
        questions = specs

    return task_questions(_Spec), [q.name for q in specs]


def cmd_decide(args: argparse.Namespace) -> int:
    from allinone.decisions import DecisionError, DecisionService, Strategy, openai_answer

    try:
        strategy = Strategy.parse(args.strategy) if args.strategy else None
    except DecisionError as exc:
        raise SystemExit(f"error: --strategy: {exc}") from None
    text = args.input
    if text == "-":
        text = sys.stdin.read()
    elif text.startswith("@"):
        text = Path(text[1:]).read_text(encoding="utf-8")
    settings = _settings(args)
    service = _service(settings)
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
    settings = _settings(args)
    service = _service(settings)
    try:
        texts = [sys.stdin.read()] if args.text == ["-"] else args.text
        for text in texts:
            r = service.extract(args.task, text)
            print(json.dumps(r.to_dict() if args.json else r.output, ensure_ascii=False))
    finally:
        service.backend.close()
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    settings = _settings(args)
    service = _service(settings)
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


def _evaluate(args: argparse.Namespace, use_calibration: bool, repeat: int, progress: bool):
    """Load the model, classify the labelled file, close the model; (task, report)."""
    from allinone.evaluation import evaluate, read_labelled

    service = _service(_settings(args), use_calibration=use_calibration)
    try:
        task = service.classify_task(args.task)
        rows = read_labelled(args.file, task, args.limit)
        report = evaluate(
            service,
            args.task,
            rows,
            batch=args.batch,
            repeat=repeat,
            progress=progress,
            file=str(args.file),
        )
    finally:
        service.backend.close()
    return task, report


def _decision_eval(args: argparse.Namespace) -> int:
    """``allinone eval`` for one decision question: ad hoc or a decide task's."""
    from allinone.decision_eval import (
        ad_hoc_question,
        evaluate_decision,
        format_decision_report,
        parse_options,
    )
    from allinone.decisions import DecisionError, Strategy, task_questions
    from allinone.evaluation import read_rows

    try:
        strategy = Strategy.parse(args.strategy) if args.strategy else None
    except DecisionError as exc:
        raise SystemExit(f"error: --strategy: {exc}") from None
    service = _service(_settings(args), use_calibration=not args.no_calibration)
    try:
        if args.predicate or args.choice or args.score:
            kind = "predicate" if args.predicate else "choice" if args.choice else "score"
            text = args.predicate or args.choice or args.score
            if kind == "predicate":
                texts: list[str] = []
                gold = [v.strip() for v in (args.true or "").split(",") if v.strip()]
                if not gold:
                    raise SystemExit("error: --predicate needs --true LABEL[,LABEL]")
            else:
                if not args.options:
                    raise SystemExit(f"error: --{kind} needs --options LABEL[=TEXT],...")
                gold, texts = parse_options(args.options)
            q = ad_hoc_question(kind, text, texts)
        else:
            task = service.tasks.get(args.task)
            names = [tq.name for tq in task.questions]
            if args.question not in names:
                raise SystemExit(f"error: --question: one of {names}")
            k = names.index(args.question)
            q = task_questions(task)[k]
            tq = task.questions[k]
            if q.kind == "predicate":
                gold = [v.strip() for v in (args.true or "").split(",") if v.strip()]
                if not gold:
                    raise SystemExit("error: a predicate needs --true LABEL[,LABEL]")
                if args.options:
                    raise SystemExit(
                        "error: --options is for choices and scores; a predicate "
                        "takes --true LABEL[,LABEL]"
                    )
            else:
                gold = list(tq.choices if q.kind == "choice" else tq.levels)
                if args.options:  # the set's own label for each option, in order
                    gold = parse_options(args.options)[0]
                    if len(set(gold)) != len(gold):
                        raise SystemExit("error: --options: each option needs its own label")
                    if len(gold) != len(q.options):
                        raise SystemExit(
                            f"error: --options: {len(q.options)} labels, one per option of "
                            f"{args.question!r} in order ({', '.join(o.text for o in q.options)})"
                        )
        rows = read_rows(args.file, args.limit)
        report = evaluate_decision(
            service,
            q,
            gold,
            rows,
            strategy,
            batch=args.batch,
            flips=not args.no_flips,
            progress=(not args.json and sys.stderr.isatty()) or args.progress,
            file=str(args.file),
        )
    finally:
        service.backend.close()
    if args.rows:
        with args.rows.open("w", encoding="utf-8") as fh:
            for row in report.predictions:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    out = report.to_dict()
    print(json.dumps(out, ensure_ascii=False) if args.json else format_decision_report(report))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from allinone.evaluation import format_report

    if args.predicate or args.choice or args.score or args.question:
        return _decision_eval(args)
    if args.rows:
        raise SystemExit(
            "error: --rows writes a decision question's answers; add --predicate, "
            "--choice, --score or --question"
        )
    _, report = _evaluate(
        args,
        use_calibration=not args.no_calibration,
        repeat=args.repeat,
        progress=(not args.json and sys.stderr.isatty()) or args.progress,
    )
    print(json.dumps(report.to_dict(), ensure_ascii=False) if args.json else format_report(report))
    return 0 if report.consistent in (None, True) else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    import numpy as np

    from allinone import calibration
    from allinone.evaluation import score_predictions

    settings = _settings(args)
    task, report = _evaluate(args, use_calibration=False, repeat=1, progress=sys.stderr.isatty())
    logps = np.array(report.logprobs)
    gold = np.array([task.labels.index(g) for g in report.gold])
    bias = calibration.fit_bias(logps, gold)
    pred = [task.labels[i] for i in np.argmax(logps + bias, axis=1)]
    after = score_predictions(task.labels, report.gold, pred)
    cal = calibration.new_calibration(
        task,
        report.model,
        bias,
        fitted_on=str(args.file),
        n=report.n,
        accuracy_before=report.raw.accuracy,
        accuracy_after=after.accuracy,
    )
    out = args.out or calibration.calibration_path(
        settings.model.cache_dir, report.model, task.name
    )
    calibration.save(cal, out)
    print(f"bias {', '.join(f'{k} {v:+.3f}' for k, v in cal.bias.items())}")
    print(
        f"accuracy on {report.n} texts of {args.file}: {report.raw.accuracy:.4f} -> "
        f"{after.accuracy:.4f} (fitted on these texts)"
    )
    print(f"saved {out}; `allinone eval`, `classify` and `serve` with this model use it")
    return 0


def _start_server(args: argparse.Namespace):
    """`allinone serve` in a child process on a free loopback port, with the caller's flags."""
    from allinone.server_process import ServerProcess

    flags: list[str] = []
    for d in args.tasks_dir:
        flags += ["--tasks-dir", str(d)]
    if args.threads:
        flags += ["--threads", str(args.threads)]
    model = args.model or os.environ.get("ALLINONE_MODEL", "default")
    srv = ServerProcess(model, None, flags, log_path=args.out / "server.log", small=False)
    try:
        srv.wait_ready(timeout=120)
    except (RuntimeError, TimeoutError) as exc:
        srv.stop()
        raise RuntimeError(f"{exc}; see {args.out / 'server.log'}") from None
    return srv


def cmd_soak(args: argparse.Namespace) -> int:
    import httpx

    from allinone.soak import SoakConfig, plot, run_soak

    args.out.mkdir(parents=True, exist_ok=True)
    srv, url, pid = None, args.url, None
    if url is None:
        srv = _start_server(args)
        url, pid = srv.url, srv.pid
    try:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        models = httpx.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"]
        model_id = next(m["id"] for m in models if m.get("kind") == "model")
        cfg = SoakConfig(
            requests=args.requests,
            concurrency=args.concurrency,
            classify_task=args.classify_task,
            chat_task=args.chat_task,
            model_id=model_id,
            warmup_fraction=args.warmup,
            sample_every=max(1, args.requests // 400),
            api_key=args.api_key,
            timeout_s=args.timeout,
            max_tokens=args.max_tokens,
            max_words=args.max_words,
            max_history=args.max_history,
            max_seconds=args.max_seconds,
        )
        report = run_soak(
            url,
            cfg,
            pid=pid,
            progress=sys.stderr.isatty(),
            checkpoint=args.out / "soak.partial.json",
        )
    finally:
        if srv is not None:
            srv.stop()
    (args.out / "soak.json").write_text(json.dumps(report.to_dict(), indent=2))
    plot(report, args.out / "soak.png")
    ok = (
        report.slope_mb_per_10k <= args.max_slope
        and not report.errors
        and report.stopped_early is None
    )
    if report.stopped_early:
        print(f"soak incomplete: {report.stopped_early}")
    print(
        f"{report.requests} requests in {report.seconds} s at concurrency {report.concurrency}; "
        f"statuses {report.by_status}"
    )
    print(
        f"after {report.warmup_requests} warm-up requests: RssAnon+VmSwap slope "
        f"{report.slope_mb_per_10k:+.3f} MB per 10k requests "
        f"(RSS {report.slope_rss_mb_per_10k:+.3f}), growth {report.growth_after_warmup_mb:+.2f} MB,"
        f" plateau {report.plateau}"
    )
    print(
        f"report {args.out / 'soak.json'}, plot {args.out / 'soak.png'}: "
        f"{'PASS' if ok else 'FAIL'} (limit {args.max_slope} MB per 10k requests)"
    )
    return 0 if ok else 1


def cmd_doctor(args: argparse.Namespace) -> int:
    """This host's CPU, how the installed llama.cpp was built, the SIMD paths it uses, and (with
    --check) whether it decodes a batched prompt of the model here."""
    import llama_cpp

    from allinone import llama_build
    from allinone.backends.host_check import build_record, check_library_runs, extra_bufts

    host = llama_build.host_description()
    simd = sorted(
        f
        for f in host["flags"].split()
        if f.startswith(("avx", "amx", "sse4", "fma", "f16c", "bmi2", "neon", "sve"))
    )
    record = build_record() or {}
    plan = record.get("plan", {})
    report = {
        "cpu": host["cpu"],
        "machine": host["machine"],
        "cpu_simd_flags": simd,
        "llama_cpp_python": llama_cpp.__version__,
        "system_info": llama_cpp.llama_print_system_info().decode().strip(),
        "build": {
            "mode": plan.get("mode"),
            "cmake_args": plan.get("cmake_args"),
            "cflags": plan.get("cflags"),
            "probes": {p["name"]: p["status"] for p in plan.get("probes", [])},
            "smoke": record.get("smoke", {}).get("message"),
            "ladder": [
                {k: t.get(k) for k in ("mode", "extra_bufts", "ok", "message", "frames")}
                for t in record.get("ladder", [])
            ],
        }
        if record
        else None,
        "extra_buffer_types": extra_bufts(),
    }
    status = 0
    if args.check:
        from allinone.models import ensure_model
        from allinone.models.fetch import default_cache_dir

        path = ensure_model(args.model or "default")
        try:
            check_library_runs(path, None if args.no_cache else default_cache_dir())
            report["check"] = f"ok: a batched decode of {path.name} ran"
        except RuntimeError as exc:
            report["check"], status = f"FAILED: {exc}", 1
    if args.json:
        print(json.dumps(report, indent=2))
        return status
    print(f"CPU:        {report['cpu']} ({report['machine']})")
    print(f"CPU SIMD:   {' '.join(simd)}")
    print(f"llama.cpp:  llama-cpp-python {report['llama_cpp_python']}")
    print(f"uses:       {report['system_info']}")
    if record:
        b = report["build"]
        print(f"built:      {b['mode']}: CMAKE_ARGS={b['cmake_args']!r} CFLAGS={b['cflags']!r}")
        tried = {k: v for k, v in b["probes"].items() if v != "skipped"}
        print(f"probes:     {tried or 'none needed (-march=native enables no probed extension)'}")
        print(f"smoke test: {b['smoke']}")
        for t in b["ladder"]:
            how = "" if t["extra_bufts"] else ", extra buffer types off"
            frames = f" [{' < '.join(t['frames'][:3])}]" if t.get("frames") else ""
            verdict = "passed" if t["ok"] else f"FAILED: {t['message']}{frames}"
            print(f"  tried:    {t['mode']}{how}: {verdict}")
    else:
        print("built:      no build record (not installed by this project's Makefile)")
    why = (record.get("load") or {}).get("why")
    print(
        "loads with: llama.cpp's extra buffer types (AMX, repacked weights) "
        + ("on" if report["extra_buffer_types"] else "OFF")
        + (f" ({why})" if why and not report["extra_buffer_types"] else "")
    )
    if "check" in report:
        print(f"check:      {report['check']}")
    return status


def cmd_tasks(args: argparse.Namespace) -> int:
    from allinone.tasks import TaskRegistry

    reg = TaskRegistry.load(args.tasks_dir or [])
    if args.json:
        print(json.dumps([t.model_dump() for t in reg], ensure_ascii=False, indent=2))
        return 0
    for t in reg:
        labels = " / ".join(t.labels) if t.labels else ""
        print(f"{t.name:<16} {t.kind:<9} {labels:<24} {t.description}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from allinone.models import CATALOG, DEFAULT_MODEL, get_entry, speech
    from allinone.models import fetch as fetching

    cache = ModelSettings().cache_dir
    if args.action == "list":
        rows: list[dict[str, Any]] = []
        for e in CATALOG.values():
            rows.append(
                {
                    "name": e.name,
                    "kind": "llm",
                    "role": e.role,
                    "default": e.name == DEFAULT_MODEL,
                    "size": e.size,
                    "sha256": e.sha256,
                    "present": fetching.is_present(e, cache),
                    "path": str(fetching.model_path(e, cache)),
                    "source": e.source(),
                    "license": e.license,
                }
            )
        for s in speech.SPEECH_CATALOG.values():
            rows.append(
                {
                    "name": s.name,
                    "kind": "speech",
                    "role": "speech (default)"
                    if s.name == speech.DEFAULT_SPEECH_MODEL
                    else "speech, " + "/".join(s.languages),
                    "default": False,
                    "size": s.size,
                    "sha256": s.files[0].sha256,  # model.bin's; every file is checked
                    "present": speech.is_speech_present(s, cache),
                    "path": str(speech.speech_dir(s, cache)),
                    "source": s.source(),
                    "license": s.license,
                }
            )
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                mark = "present" if r["present"] else "absent"
                print(
                    f"{r['name']:<38} {r['role']:<16} {r['size'] / 1e6:8.1f} MB  {mark:<8} "
                    f"sha256 {r['sha256'][:16]}…  {r['source']}"
                )
        return 0
    names = args.names or [DEFAULT_MODEL]
    for name in names:
        entry = get_entry(name)
        voice = speech.get_speech_entry(name) if entry is None else None
        fetch: Any
        verify: Any
        path: Any
        if entry is not None:
            fetch, verify, path = fetching.fetch, fetching.verify, fetching.model_path
            what: Any = entry
        elif voice is not None:
            fetch, verify, path = speech.fetch_speech, speech.verify_speech, speech.speech_dir
            what = voice
        else:
            known = [*CATALOG, *speech.SPEECH_CATALOG]
            print(f"unknown model {name!r}; catalog: {', '.join(known)}", file=sys.stderr)
            return 2
        if args.action == "fetch":
            print(fetch(what, cache))
        elif args.action == "verify":
            verify(what, cache)
            print(f"{what.name}: sha256 ok")
        elif args.action == "path":
            print(path(what, cache))
    return 0


def _plan_from_args(args: argparse.Namespace) -> dict:
    from allinone.planner.plan import PlanRequest, make_plan

    if getattr(args, "plan", None):
        return json.loads(Path(args.plan).read_text(encoding="utf-8"))
    return make_plan(
        PlanRequest(
            model=args.model or "default",
            dtype=args.dtype,
            kv_dtype=args.kv_dtype,
            context=args.context,
            concurrency=args.concurrency,
            devices=args.devices,
            instances=args.instances,
            headroom=args.headroom,
            # the target's threads, not this machine's: deploy files set the container's CPU
            # limit to the same number, and the server's own count (cpu_budget) agrees with it
            threads=args.threads or 2,
        )
    )


def cmd_plan(args: argparse.Namespace) -> int:
    from allinone.planner.report import format_plan

    plan = _plan_from_args(args)
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0 if plan["fits"] else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    from allinone.planner.deploy import DeployOptions, render, write

    plan = _plan_from_args(args)
    opts = DeployOptions(drain_timeout_s=args.drain_timeout, gpus_per_node=args.gpus_per_node)
    if args.image:
        opts.image = args.image
    if args.exec_path:
        opts.exec_path = args.exec_path
    files = render(args.target, plan, opts)
    if not plan["fits"]:
        print("allinone: warning: the plan does not fit its devices", file=sys.stderr)
    if args.out is None:
        for name, text in files.items():
            print(f"# ---- {name}\n{text}")
    else:
        for path in write(files, args.out):
            print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed for tests and docs)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--tasks-dir",
        action="append",
        type=Path,
        default=[],
        help="folder of extra task files (*.toml); may repeat (env ALLINONE_TASKS_DIR)",
    )
    common.add_argument("-v", "--verbose", action="store_true", help="log more")
    add_settings_flags(common, ModelSettings, EngineSettings)

    p = argparse.ArgumentParser(prog="allinone", description=__doc__)
    p.add_argument("--version", action="version", version=f"allinone {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("serve", parents=[common], help="run the HTTP server")
    add_settings_flags(s, ServerSettings, SpeechSettings)
    s.set_defaults(func=cmd_serve)

    ls = sub.add_parser(
        "listen",
        parents=[common],
        help="transcribe an audio file, then run an extract task (voice-note) on the transcript",
    )
    ls.add_argument("file", type=Path, help="audio file (wav, mp3, m4a, ogg, flac, webm)")
    ls.add_argument("--task", default="voice-note", help="extract task (default voice-note)")
    ls.add_argument("--language", help="ISO 639-1 code (default: detect among --speech-languages)")
    ls.add_argument("--prompt", help="text to steer the transcription (names, spellings)")
    ls.add_argument("--transcript-only", action="store_true", help="skip the task (no LLM)")
    ls.add_argument("--json", action="store_true", help="print one JSON object")
    ls.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
    add_settings_flags(ls, SpeechSettings)
    ls.set_defaults(func=cmd_listen)

    c = sub.add_parser("classify", parents=[common], help="classify text(s); '-' reads stdin")
    c.add_argument("text", nargs="+", help="text(s) to classify, or '-' for one per stdin line")
    c.add_argument("--task", default="sentiment", help="classify task (default sentiment)")
    c.add_argument("--json", action="store_true", help="print one JSON object per text")
    c.add_argument("--no-calibration", action="store_true", help="ignore a stored calibration")
    c.set_defaults(func=cmd_classify)

    x = sub.add_parser(
        "extract",
        parents=[common],
        help="answer an extract task (e.g. summarize) as JSON; '-' reads stdin",
    )
    x.add_argument("text", nargs="+", help="text(s), or '-' for all of stdin as one text")
    x.add_argument("--task", default="summarize", help="extract task (default summarize)")
    x.add_argument("--json", action="store_true", help="include task name and latency")
    x.set_defaults(func=cmd_extract)

    dc = sub.add_parser(
        "decide",
        parents=[common],
        help="answer several questions about one input at once (predicate, choice, score)",
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
    dc.set_defaults(func=cmd_decide)

    ch = sub.add_parser("chat", parents=[common], help="interactive terminal chat")
    ch.add_argument("--task", default="chat", help="chat task (default chat)")
    ch.add_argument("--system", help="system prompt instead of the task's")
    ch.set_defaults(func=cmd_chat)

    labelled = argparse.ArgumentParser(add_help=False)
    labelled.add_argument("file", type=Path, help="label<TAB>text file (values mapped by the task)")
    labelled.add_argument("--task", default="sentiment", help="classify task (default sentiment)")
    labelled.add_argument("--limit", type=int, help="first N rows only")
    labelled.add_argument("--batch", type=int, default=8, help="texts in flight at once (8)")

    e = sub.add_parser(
        "eval", parents=[common, labelled], help="accuracy, F1, latency on a labelled TSV"
    )
    e.add_argument("--repeat", type=int, default=1, help="run K times; check labels never change")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--no-calibration", action="store_true", help="ignore a stored calibration")
    e.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
    asked = e.add_mutually_exclusive_group()
    asked.add_argument("--predicate", metavar="TEXT", help="evaluate a yes/no question instead")
    asked.add_argument("--choice", metavar="TEXT", help="evaluate a choice question instead")
    asked.add_argument("--score", metavar="TEXT", help="evaluate a score question instead")
    asked.add_argument("--question", metavar="NAME", help="a question of the decide --task")
    e.add_argument("--true", metavar="LABELS", help="predicate: the labels that mean true")
    e.add_argument(
        "--options",
        metavar="LABEL[=TEXT],...",
        help="choice/score: gold labels (=TEXT: as the model sees it); with --question, "
        "the set's label for each of the question's options, in order",
    )
    e.add_argument(
        "--rows", type=Path, metavar="FILE", help="decisions: write each row's answer (JSON lines)"
    )
    e.add_argument("--strategy", help="decision strategy (default: the server's)")
    e.add_argument("--no-flips", action="store_true", help="skip the negation/reversal pass")
    e.set_defaults(func=cmd_eval)

    cb = sub.add_parser(
        "calibrate",
        parents=[common, labelled],
        help="fit per-label biases on a labelled dev TSV (never the test set) and store them",
    )
    cb.add_argument("--out", type=Path, help="where to write (default: the model cache)")
    cb.set_defaults(func=cmd_calibrate)

    so = sub.add_parser(
        "soak",
        parents=[common],
        help="drive a server with a request mix; fit memory growth; plot it",
    )
    so.add_argument("--url", help="a running server (default: start one with these flags)")
    so.add_argument("--requests", type=int, default=1000)
    so.add_argument("--concurrency", type=int, default=4)
    so.add_argument("--warmup", type=float, default=0.2, help="fraction discarded (default 0.2)")
    so.add_argument("--classify-task", default="sentiment")
    so.add_argument("--chat-task", default="chat")
    so.add_argument("--api-key", help="key for a server that requires one")
    so.add_argument("--max-tokens", type=int, default=24, help="chat reply cap (24)")
    so.add_argument(
        "--max-words", type=int, default=200, help="longest text to classify, words (200)"
    )
    so.add_argument(
        "--max-history",
        type=int,
        default=40,
        help="messages a conversation grows to before it starts over (40)",
    )
    so.add_argument(
        "--timeout", type=float, default=300.0, help="client timeout per request, s (300)"
    )
    so.add_argument(
        "--max-seconds",
        type=float,
        help="time budget: stop sending requests after this long and fail with the measured "
        "rate (default: none)",
    )
    so.add_argument(
        "--max-slope",
        type=float,
        default=1.0,
        help="fail above this many MB per 10k requests (default 1.0)",
    )
    so.add_argument("--out", type=Path, default=Path("soak-results"))
    so.set_defaults(func=cmd_soak)

    from allinone.planner.deploy import TARGETS
    from allinone.planner.formats import DTYPES, KV_DTYPES

    shape = argparse.ArgumentParser(add_help=False)
    shape.add_argument("--model", help="catalog name, known model, config.json or GGUF (default)")
    shape.add_argument("--dtype", choices=DTYPES, help="weight format (cpu: q4_k_m, gpu: bf16)")
    shape.add_argument("--kv-dtype", choices=list(KV_DTYPES), default="fp16")
    shape.add_argument("--context", type=int, default=2048, help="tokens per sequence (2048)")
    shape.add_argument("--concurrency", type=int, default=4, help="sequences at once (4)")
    shape.add_argument("--devices", default="cpu", help="cpu, cpu:16GiB, 4x24GiB, 1x80GiB")
    shape.add_argument("--instances", type=int, default=1, help="instances on those devices")
    shape.add_argument("--headroom", type=float, default=0.10, help="memory kept free (0.10)")
    shape.add_argument(
        "--threads",
        type=int,
        help="CPU threads per instance (2); deploy files give each instance that many CPUs",
    )

    pl = sub.add_parser("plan", parents=[shape], help="memory and limits for a model deployment")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=cmd_plan, tasks_dir=[], verbose=False)

    dp = sub.add_parser("deploy", parents=[shape], help="render deployment files from a plan")
    dp.add_argument("target", choices=TARGETS)
    dp.add_argument("--plan", type=Path, help="a plan from `allinone plan --json` (else the flags)")
    dp.add_argument("--out", type=Path, help="folder to write (default: print)")
    dp.add_argument("--image", help="container image of this server")
    dp.add_argument("--exec-path", help="allinone executable for the systemd unit")
    dp.add_argument("--drain-timeout", type=int, default=30, help="seconds to drain (30)")
    dp.add_argument("--gpus-per-node", type=int, help="GPUs per machine (vllm multi-node)")
    dp.set_defaults(func=cmd_deploy, tasks_dir=[], verbose=False)

    t = sub.add_parser("tasks", parents=[common], help="list tasks")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=cmd_tasks)

    d = sub.add_parser(
        "doctor", help="this CPU, how llama.cpp was built and which SIMD paths it uses"
    )
    d.add_argument("--model", help="model for --check (default: the default model)")
    d.add_argument("--check", action="store_true", help="run a 64-token decode in a child")
    d.add_argument("--no-cache", action="store_true", help="with --check: ignore earlier passes")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_doctor, tasks_dir=[], verbose=False)

    m = sub.add_parser("models", help="list, fetch or verify catalog models")
    m.add_argument("action", nargs="?", default="list", choices=["list", "fetch", "verify", "path"])
    m.add_argument("names", nargs="*", help="catalog names or aliases (default: the default model)")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_models, tasks_dir=[], model=None, verbose=False)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``allinone`` command."""
    from allinone.backends.base import BackendError
    from allinone.models import ModelFetchError
    from allinone.tasks import TaskError

    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args) or 0)
    except (ModelFetchError, TaskError, BackendError, ValueError, OSError) as exc:
        print(f"allinone: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
