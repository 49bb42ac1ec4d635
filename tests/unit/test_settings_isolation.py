"""The tests' settings come from the code's defaults, not from a developer's environment."""

import os

from allinone.settings import Settings


def test_a_developers_env_file_and_variables_do_not_reach_the_tests(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text('ALLINONE_API_KEYS=["dev-key"]\nALLINONE_PARALLEL=9\n')
    monkeypatch.chdir(tmp_path)
    assert os.environ["ALLINONE_ENV_FILE"] == os.devnull
    assert not [
        n
        for n in os.environ
        if n.startswith("ALLINONE_") and n not in ("ALLINONE_CACHE_DIR", "ALLINONE_ENV_FILE")
    ]
    s = Settings()
    assert s.server.api_keys == [] and s.engine.parallel == 4
