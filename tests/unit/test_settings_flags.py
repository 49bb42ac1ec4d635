"""Every setting is a flag, typed and documented from its settings class."""

import argparse

import pytest

from allinone.cli import build_parser, load_settings, main
from allinone.cli.ops import server_flags
from allinone.settings import EngineSettings, ModelSettings, ServerSettings, SpeechSettings
from allinone.settings_flags import given_flags, settings_group_title


def test_every_setting_has_a_serve_flag_with_its_env_variable_in_the_help():
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    dests = {a.dest: a for a in serve._actions}
    for cls in (ModelSettings, EngineSettings, ServerSettings):
        for name in cls.model_fields:
            assert name in dests, f"no flag for {cls.__name__}.{name}"
            assert f"ALLINONE_{name.upper()}" in (dests[name].help or "")


def test_flags_override_and_omitted_flags_leave_defaults():
    args = build_parser().parse_args(
        [
            "serve",
            "--parallel",
            "6",
            "--no-reuse-slots",
            "--api-keys",
            '["a", "b"]',
            "--drain-timeout-s",
            "2.5",
            "--choice-mode",
            "grammar",
        ]
    )
    s = load_settings(args)
    assert s.engine.parallel == 6 and s.engine.reuse_slots is False
    assert s.server.api_keys == ["a", "b"] and s.server.drain_timeout_s == 2.5
    assert s.model.choice_mode == "grammar"
    assert s.engine.ctx_per_seq == 2048 and s.server.port == 8000  # defaults stay


def test_an_unknown_backend_is_refused_at_once_with_the_valid_ones(capsys):
    assert main(["serve", "--backend", "lama"]) == 2
    err = capsys.readouterr().err
    assert "unknown backend 'lama'" in err and "llama_cpp" in err and "openai" in err


def test_a_bad_choice_is_refused_by_the_parser():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--choice-mode", "nope"])


def test_list_settings_come_from_the_environment_when_their_flag_is_not_given(
    monkeypatch, tmp_path
):
    monkeypatch.setenv("ALLINONE_TASKS_DIR", f'["{tmp_path}"]')
    monkeypatch.setenv("ALLINONE_CORS_ORIGINS", '["http://app.example"]')
    settings = load_settings(build_parser().parse_args(["serve"]))
    assert settings.server.tasks_dir == [tmp_path]
    assert settings.server.cors_origins == ["http://app.example"]
    flagged = load_settings(build_parser().parse_args(["serve", "--tasks-dir", "/x"]))
    assert [str(p) for p in flagged.server.tasks_dir] == ["/x"]


def _commands():
    return build_parser()._subparsers._group_actions[0].choices


def test_each_command_takes_only_the_flag_groups_it_uses(capsys):
    llm = {"serve", "classify", "extract", "decide", "chat", "listen", "eval", "calibrate", "soak"}
    takes = {
        ModelSettings: llm,
        EngineSettings: llm,
        ServerSettings: {"serve"},
        SpeechSettings: {"serve", "listen"},
    }
    engine_flags = {f"--{n.replace('_', '-')}" for n in EngineSettings.model_fields}
    for name, parser in _commands().items():
        titles = {g.title for g in parser._action_groups}
        options = {o for a in parser._actions for o in a.option_strings}
        for cls, commands in takes.items():
            assert (settings_group_title(cls) in titles) is (name in commands), (name, cls)
        assert (engine_flags <= options) is (name in llm), name
    assert "--api-keys" in {o for a in _commands()["serve"]._actions for o in a.option_strings}
    assert "--api-keys" not in {o for a in _commands()["soak"]._actions for o in a.option_strings}
    with pytest.raises(SystemExit):
        main(["tasks", "--help"])
    out = capsys.readouterr().out
    assert "--tasks-dir" in out
    assert "--parallel" not in out and "--model" not in out and "EngineSettings" not in out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tasks", "--parallel", "8"])


def test_every_default_is_in_the_help_as_the_parser_has_it():
    for name, parser in _commands().items():
        text = " ".join(parser.format_help().split())  # undo the line wrapping
        for action in parser._actions:
            if action.default in (None, [], argparse.SUPPRESS) or action.default is False:
                continue
            assert f"(default: {action.default})" in text, (name, action.dest)
    serve = " ".join(_commands()["serve"].format_help().split())
    # settings flags default to None (a flag left out must not hide the env): the field's default
    assert "(default: 4; env ALLINONE_PARALLEL)" in serve
    assert "(default: 128; env ALLINONE_PROMPT_CACHE_MB)" in serve
    assert '(default: ["GET", "POST", "OPTIONS"]; env ALLINONE_CORS_METHODS)' in serve


def test_given_flags_parse_back_to_the_same_settings(tmp_path):
    argv = [
        "serve",
        "--parallel",
        "6",
        "--no-reuse-slots",
        "--grammar-prewarm",
        "--seed",
        "0",
        "--gpu-memory-utilization",
        "0.5",
        "--choice-mode",
        "grammar",
        "--cache-dir",
        str(tmp_path),
        "--api-keys",
        '["a", "b c"]',
        "--drain-timeout-s",
        "2.5",
        "--speech-languages",
        '["en"]',
    ]
    args = build_parser().parse_args(argv)
    classes = (ModelSettings, EngineSettings, ServerSettings, SpeechSettings)
    again = build_parser().parse_args(["serve", *given_flags(args, *classes)])
    first, second = load_settings(args), load_settings(again)
    for group in ("model", "engine", "server", "speech"):
        assert getattr(first, group).model_dump() == getattr(second, group).model_dump(), group
    assert second.engine.seed == 0 and second.engine.reuse_slots is False
    assert second.server.api_keys == ["a", "b c"] and second.speech.speech_languages == ["en"]
    assert given_flags(build_parser().parse_args(["serve"]), *classes) == []


def test_soak_gives_its_server_every_model_and_engine_flag_it_was_given():
    args = build_parser().parse_args(
        [
            "soak",
            "--model",
            "tiny",
            "--parallel",
            "8",
            "--prompt-cache-mb",
            "0",
            "--no-reuse-slots",
            "--tasks-dir",
            "/t",
            "--requests",
            "5",
            "--concurrency",
            "2",
        ]
    )
    flags = server_flags(args)
    # --model goes to the server as ALLINONE_MODEL; soak's own flags (--requests ...) stay home
    assert flags == [
        "--tasks-dir", "/t", "--parallel", "8", "--no-reuse-slots", "--prompt-cache-mb", "0"
    ]  # fmt: skip
    served = load_settings(build_parser().parse_args(["serve", *flags]))
    assert served.engine.parallel == 8 and served.engine.prompt_cache_mb == 0
    assert served.engine.reuse_slots is False and [str(p) for p in served.server.tasks_dir] == [
        "/t"
    ]


def test_soak_refuses_engine_flags_for_a_server_it_does_not_start(capsys, tmp_path):
    rc = main(["soak", "--url", "http://127.0.0.1:9", "--parallel", "8", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "--parallel 8" in err and "--url" in err
    assert main(["soak", "--url", "http://127.0.0.1:9", "--model", "tiny"]) == 2
    assert "--model tiny" in capsys.readouterr().err


def test_tasks_lists_the_folders_serve_would_load(monkeypatch, tmp_path, capsys):
    extra = tmp_path / "more"
    extra.mkdir()
    (tmp_path / "more" / "spam.toml").write_text(
        'kind = "classify"\ndescription = "Spam or not"\nsystem = "Spam?"\n'
        'labels = ["spam", "ham"]\n',
        encoding="utf-8",
    )
    assert main(["tasks"]) == 0
    assert "spam" not in capsys.readouterr().out.split()
    monkeypatch.setenv("ALLINONE_TASKS_DIR", f'["{extra}"]')
    assert main(["tasks"]) == 0
    assert "spam" in capsys.readouterr().out.split()
    assert main(["tasks", "--tasks-dir", str(tmp_path)]) == 0  # the flag wins: no task there
    assert "spam" not in capsys.readouterr().out.split()
