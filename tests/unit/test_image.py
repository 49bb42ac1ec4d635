"""The image build's inputs: the Debian mirror from apt's sources, the pins it installs, and
the containers.conf podman runs with."""

import tomllib

import pytest

from allinone.container.image import (
    CONTAINERS_CONF,
    ImageError,
    _pins,
    debian_mirror,
    podman_env,
)


def test_mirror_from_deb822_sources_skips_security_and_other_suites(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\n# http://snapshot.debian.org/archive/debian/20250520T000000Z\n"
        "URIs: http://deb.debian.org/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\n\n"
        "Types: deb\nURIs: http://deb.debian.org/debian-security\nSuites: bookworm-security\n"
    )
    (tmp_path / "sources.list.d" / "other.list").write_text(
        "deb https://packages.example.com/apt cloud-sdk-bookworm main\n"
    )
    assert debian_mirror("bookworm", tmp_path) == "http://deb.debian.org/debian"
    with pytest.raises(ImageError, match="--mirror"):
        debian_mirror("trixie", tmp_path)


def test_mirror_from_a_one_line_sources_list(tmp_path):
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://mirror.example/debian bookworm main\n"
    )
    assert debian_mirror("bookworm", tmp_path) == "http://mirror.example/debian"


def test_pins_leave_out_the_engine_and_the_build_tools(tmp_path):
    req = tmp_path / "requirements.txt"
    req.write_text(
        "# comment\nllama-cpp-python==0.3.36\nfastapi==0.163.2  # why\nhatchling==1.33.0\n"
        "\nllguidance==1.9.1\n"
    )
    assert _pins(req) == ["fastapi==0.163.2", "llguidance==1.9.1"]


def test_podman_runs_with_runc_and_the_lower_rlimits(monkeypatch):
    monkeypatch.delenv("CONTAINERS_CONF", raising=False)
    assert podman_env()["CONTAINERS_CONF"] == str(CONTAINERS_CONF)
    conf = tomllib.loads(CONTAINERS_CONF.read_text())
    assert conf["engine"]["runtime"] == "runc"
    assert conf["containers"]["default_ulimits"] == ["nofile=20000:20000", "nproc=32768:32768"]
    monkeypatch.setenv("CONTAINERS_CONF", "/etc/other.conf")
    assert podman_env()["CONTAINERS_CONF"] == "/etc/other.conf"
