"""Every setting is a flag, typed and documented from its settings class."""

import pytest

from allinone.cli import _settings, build_parser, main
from allinone.settings import EngineSettings, ModelSettings, ServerSettings


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
    s = _settings(args)
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
    settings = _settings(build_parser().parse_args(["serve"]))
    assert settings.server.tasks_dir == [tmp_path]
    assert settings.server.cors_origins == ["http://app.example"]
    flagged = _settings(build_parser().parse_args(["serve", "--tasks-dir", "/x"]))
    assert [str(p) for p in flagged.server.tasks_dir] == ["/x"]
