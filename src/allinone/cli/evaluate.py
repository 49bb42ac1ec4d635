"""`allinone eval` and `allinone calibrate`: the model against a labelled file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from allinone.cli.common import FlagGroups, add_command, load_settings, open_service


def _evaluate(args: argparse.Namespace, use_calibration: bool, repeat: int, progress: bool):
    """Load the model, classify the labelled file, close the model; (task, report)."""
    from allinone.evaluation import evaluate, read_labelled

    service = open_service(load_settings(args), use_calibration=use_calibration)
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
    from allinone.decisions import Strategy, task_questions
    from allinone.evaluation import read_rows
    from allinone.serving.errors import InputError

    try:
        strategy = Strategy.parse(args.strategy) if args.strategy else None
    except InputError as exc:
        raise SystemExit(f"error: --strategy: {exc}") from None
    service = open_service(load_settings(args), use_calibration=not args.no_calibration)
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

    settings = load_settings(args)
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


def add_commands(sub: argparse._SubParsersAction, flags: FlagGroups) -> None:
    """eval, calibrate: model and engine flags, and a labelled file."""
    labelled = argparse.ArgumentParser(add_help=False)
    labelled.add_argument("file", type=Path, help="label<TAB>text file (values mapped by the task)")
    labelled.add_argument("--task", default="sentiment", help="classify task")
    labelled.add_argument("--limit", type=int, help="first N rows only")
    labelled.add_argument("--batch", type=int, default=8, help="texts in flight at once")

    e = add_command(
        sub, "eval", cmd_eval, "accuracy, F1, latency on a labelled TSV", [*flags.llm, labelled]
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

    cb = add_command(
        sub,
        "calibrate",
        cmd_calibrate,
        "fit per-label biases on a labelled dev TSV (never the test set) and store them",
        [*flags.llm, labelled],
    )
    cb.add_argument("--out", type=Path, help="where to write (default: the model cache)")
