"""Operating a deployment: `allinone soak` (memory under a request mix) and `allinone doctor`
(this CPU and the llama.cpp build)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from allinone.cli.common import FlagGroups, add_command
from allinone.settings import EngineSettings, ModelSettings
from allinone.settings_flags import given_flags


def server_flags(args: argparse.Namespace) -> list[str]:
    """The `allinone serve` flags of the server soak starts: its task folders and every model and
    engine flag soak was given (--model travels as ALLINONE_MODEL), so that the soak measures
    the settings it names; what was not given comes from env/.env/defaults, as for `serve`."""
    flags: list[str] = []
    for d in args.tasks_dir:
        flags += ["--tasks-dir", str(d)]
    return flags + given_flags(args, ModelSettings, EngineSettings, skip=("model",))


def _start_server(args: argparse.Namespace, flags: list[str]):
    """`allinone serve` in a child process on a free loopback port, with ``flags``."""
    from allinone.server_process import ServerProcess

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

    flags = server_flags(args)
    if args.url is not None and (flags or args.model):
        given = flags + (["--model", args.model] if args.model else [])
        raise ValueError(
            f"{' '.join(given)}: these set up the server soak starts; the server at --url "
            "runs with its own model and settings"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    srv, url, pid = None, args.url, None
    if url is None:
        srv = _start_server(args, flags)
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
    if srv is not None:
        report.server_flags = flags
    (args.out / "soak.json").write_text(json.dumps(report.to_dict(), indent=2))
    plot(report, args.out / "soak.png")
    ok = (
        report.slope_mb_per_10k <= args.max_slope
        and not report.errors
        and report.stopped_early is None
    )
    if report.stopped_early:
        print(f"soak incomplete: {report.stopped_early}")
    if report.server_flags is not None:
        started = " ".join(report.server_flags) or "no flags"
        print(f"server started with {started} (the rest from env/.env/defaults)")
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


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """soak: model and engine flags (for the server it starts); doctor: its own few."""
    so = add_command(
        sub,
        "soak",
        cmd_soak,
        "drive a server with a request mix; fit memory growth; plot it",
        flags.llm,
    )
    so.add_argument(
        "--url",
        help="a running server (default: start one with the model and engine flags given here)",
    )
    so.add_argument("--requests", type=int, default=1000, help="requests to send")
    so.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    so.add_argument("--warmup", type=float, default=0.2, help="fraction discarded")
    so.add_argument("--classify-task", default="sentiment", help="classify task of the mix")
    so.add_argument("--chat-task", default="chat", help="chat task of the mix")
    so.add_argument("--api-key", help="key for a server that requires one")
    so.add_argument("--max-tokens", type=int, default=24, help="chat reply cap")
    so.add_argument("--max-words", type=int, default=200, help="longest text to classify, words")
    so.add_argument(
        "--max-history",
        type=int,
        default=40,
        help="messages a conversation grows to before it starts over",
    )
    so.add_argument("--timeout", type=float, default=300.0, help="client timeout per request, s")
    so.add_argument(
        "--max-seconds",
        type=float,
        help="time budget: stop sending requests after this long and fail with the measured "
        "rate (default: none)",
    )
    so.add_argument(
        "--max-slope", type=float, default=1.0, help="fail above this many MB per 10k requests"
    )
    so.add_argument(
        "--out", type=Path, default=Path("soak-results"), help="folder for the report and plot"
    )

    d = add_command(
        sub,
        "doctor",
        cmd_doctor,
        "this CPU, how llama.cpp was built and which SIMD paths it uses",
        [flags.verbose],
    )
    d.add_argument("--model", help="model for --check (default: the default model)")
    d.add_argument("--check", action="store_true", help="run a 64-token decode in a child")
    d.add_argument("--no-cache", action="store_true", help="with --check: ignore earlier passes")
    d.add_argument("--json", action="store_true")
