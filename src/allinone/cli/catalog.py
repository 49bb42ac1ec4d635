"""What there is to run: `allinone tasks` (task files) and `allinone models` (the catalog)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from allinone.cli.common import FlagGroups, add_command
from allinone.settings import ModelSettings


def cmd_tasks(args: argparse.Namespace) -> int:
    from allinone.settings import ServerSettings
    from allinone.tasks import TaskRegistry

    # The folders `serve` would load: the flags, else ALLINONE_TASKS_DIR.
    folders = args.tasks_dir or ServerSettings().tasks_dir
    reg = TaskRegistry.load(folders)
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


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """tasks: the task folders only; models: no settings flags (the cache from env/.env)."""
    t = add_command(sub, "tasks", cmd_tasks, "list tasks", [flags.verbose, flags.tasks_dir])
    t.add_argument("--json", action="store_true")

    m = add_command(sub, "models", cmd_models, "list, fetch or verify catalog models")
    m.add_argument(
        "action",
        nargs="?",
        default="list",
        choices=["list", "fetch", "verify", "path"],
        help="list the catalog, or fetch, verify (sha256) or print the path of models",
    )
    m.add_argument("names", nargs="*", help="catalog names or aliases (default: the default model)")
    m.add_argument("--json", action="store_true")
