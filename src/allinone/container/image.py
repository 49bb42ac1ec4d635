"""Build this server's OCI image with podman, with no registry and no network in the build.

1. A Debian base made by ``mmdebstrap`` from the Debian mirror this machine's apt sources use
   (minbase + python3, python3-venv, libgomp1; documentation left out), ``podman import``-ed as
   ``localhost/allinone-base:<suite>-<hash>`` and kept for later builds.
2. Wheels fetched on the host: ``pip wheel`` for every pin of requirements.txt and what they
   need, this project's own wheel, and the llama-cpp-python wheel this environment runs (the
   project's wheelhouse, built and smoke-tested for this host by ``allinone.llama_build``).
3. ``podman build --network none --pull never`` of the packaged Containerfile, with the wheels
   mounted for its one RUN step.

Podman runs with the packaged ``containers.conf`` (runc, lower rlimits: these hosts' cgroup v1
and hard limits need both) unless ``CONTAINERS_CONF`` names another file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from allinone import __version__
from allinone.models.fetch import default_cache_dir

HERE = Path(__file__).resolve().parent
CONTAINERFILE = HERE / "Containerfile"
CONTAINERS_CONF = HERE / "containers.conf"
BASE_PACKAGES = ("python3", "python3-venv", "libgomp1")
# Left out of the base: documentation, manuals and translations (copyright files stay).
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
)
# Pins the image does not install: the engine comes from the wheelhouse; the rest only build or
# install this project in a development tree.
NOT_IN_IMAGE = {"llama-cpp-python", "hatchling", "editables"}
TOOLS = ("podman", "mmdebstrap", "runc")


class ImageError(RuntimeError):
    """The image cannot be built here; the message says what is missing and how to fix it."""


@dataclass
class ImageOptions:
    """What to build and from where. ``work``: base tarball, wheels and build context."""

    tag: str = f"localhost/allinone:{__version__}"
    suite: str = "bookworm"
    mirror: str | None = None
    work: Path = field(default_factory=lambda: default_cache_dir() / "image")
    requirements: Path = field(
        default_factory=lambda: Path(__file__).resolve().parents[3] / "requirements.txt"
    )
    project: Path = field(default_factory=lambda: Path(__file__).resolve().parents[3])
    llama_wheel: Path | None = None


def podman_env() -> dict[str, str]:
    """The environment for podman and buildah: the packaged containers.conf unless the caller's
    ``CONTAINERS_CONF`` names one."""
    env = dict(os.environ)
    env.setdefault("CONTAINERS_CONF", str(CONTAINERS_CONF))
    return env


def podman(*args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` with :func:`podman_env`, capturing text output. It runs in the
    temporary folder: conmon 2.1 on cgroup v1 leaves a file named ``oom`` in its working folder
    when a container is OOM-killed."""
    kw.setdefault("cwd", tempfile.gettempdir())
    res = subprocess.run(["podman", *args], env=podman_env(), capture_output=True, text=True, **kw)
    if check and res.returncode != 0:
        raise ImageError(f"podman {' '.join(args[:3])} failed: {res.stderr.strip()[-2000:]}")
    return res


def check_tools() -> None:
    """Raise ImageError naming the missing tools (Debian packages: ``make container-tools``)."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        raise ImageError(
            f"{', '.join(missing)} not installed: `make container-tools` installs Debian's "
            "podman, buildah, runc, mmdebstrap and what they need"
        )


def debian_mirror(suite: str, sources: Path = Path("/etc/apt")) -> str:
    """The Debian mirror URL this machine's apt sources use for ``suite`` (deb822 ``.sources``
    files or one-line ``.list`` entries); security and update suites are skipped."""
    files = [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]
    for path in files:
        try:
            text = path.read_text()
        except OSError:
            continue
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                keys: dict[str, str] = {}
                for line in stanza.splitlines():
                    if line.strip() and not line.lstrip().startswith("#") and ":" in line:
                        k, _, v = line.partition(":")
                        keys[k.strip().lower()] = v.strip()
                if (
                    "deb" in keys.get("types", "").split()
                    and suite in keys.get("suites", "").split()
                ):
                    return keys["uris"].split()[0]
        else:
            for line in text.splitlines():
                parts = re.sub(r"\[[^]]*\]", "", line).split()
                if len(parts) >= 3 and parts[0] == "deb" and parts[2] == suite:
                    return parts[1]
    raise ImageError(
        f"no apt source for Debian {suite!r} under {sources}: pass --mirror URL "
        "(a Debian mirror, e.g. http://deb.debian.org/debian)"
    )


def _digest(*parts: str) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def build_base(opts: ImageOptions, say: Callable[[str], None]) -> str:
    """The Debian base image's tag, made with mmdebstrap and ``podman import`` unless present."""
    mirror = opts.mirror or debian_mirror(opts.suite)
    tag = f"localhost/allinone-base:{opts.suite}-{_digest(mirror, *BASE_PACKAGES, *DPKG_EXCLUDES)}"
    if podman("image", "exists", tag, check=False).returncode == 0:
        say(f"base {tag}: present")
        return tag
    opts.work.mkdir(parents=True, exist_ok=True)
    tar = opts.work / f"{tag.rsplit(':', 1)[1]}.tar"
    t0 = time.perf_counter()
    cmd = [
        "mmdebstrap",
        "--quiet",
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        *(f"--dpkgopt={o}" for o in DPKG_EXCLUDES),
        '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin',
        opts.suite,
        str(tar),
        mirror,
    ]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise ImageError(f"mmdebstrap failed: {res.stderr.strip()[-2000:]}")
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tar), tag)
    tar.unlink()
    took = time.perf_counter() - t0
    say(f"base {tag}: mmdebstrap {opts.suite} from {mirror} and podman import, {took:.0f} s")
    return tag


def _pins(requirements: Path) -> list[str]:
    pins = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and line.split("==")[0].strip().lower() not in NOT_IN_IMAGE:
            pins.append(line)
    return pins


def llama_wheel(cache_dir: Path) -> Path:
    """The llama-cpp-python wheel this environment runs: the wheelhouse folder whose build.json
    is the one the Makefile copied into the virtual environment (``llama-build.json``)."""
    record = Path(sys.prefix) / "llama-build.json"
    if not record.is_file():
        raise ImageError(
            f"{record} is missing: run `make setup` (it builds llama-cpp-python into the "
            "wheelhouse), or pass --llama-wheel FILE"
        )
    want = json.loads(record.read_text())
    for build in sorted((cache_dir / "wheelhouse").glob("*/build.json")):
        try:
            same = json.loads(build.read_text()) == want
        except (OSError, ValueError):
            continue
        wheels = sorted(build.parent.glob("llama_cpp_python-*.whl"))
        if same and wheels:
            return wheels[-1]
    raise ImageError(
        f"no wheel in {cache_dir / 'wheelhouse'} matches {record}: run `make setup`, or pass "
        "--llama-wheel FILE"
    )


def fetch_wheels(opts: ImageOptions, wheels: Path, cache_dir: Path, say) -> Path:
    """Every wheel the image installs, into ``wheels``; returns the llama-cpp-python wheel."""
    if wheels.exists():
        shutil.rmtree(wheels)
    wheels.mkdir(parents=True)
    t0 = time.perf_counter()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    pins = wheels / "pins.txt"
    pins.write_text("\n".join(_pins(opts.requirements)) + "\n")
    for args in (
        # with their dependencies: the pins are not a closed set (fastapi needs
        # opentelemetry-api, which requirements.txt leaves to the resolver)
        ["wheel", "-w", str(wheels), "-r", str(pins)],
        ["wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(opts.project)],
    ):
        res = subprocess.run([*pip, *args], capture_output=True, text=True)
        if res.returncode != 0:
            raise ImageError(f"pip {' '.join(args[:2])} failed: {res.stderr.strip()[-2000:]}")
    # kept: the image installs the same pins (llguidance, for one, is no dependency of the package)
    llama = opts.llama_wheel or llama_wheel(cache_dir)
    shutil.copy2(llama, wheels / llama.name)
    # The build's record goes into the image's venv too: the server reads from it whether this
    # build loads models with llama.cpp's extra buffer types (host_check.extra_bufts).
    if (llama.parent / "build.json").is_file():
        shutil.copy2(llama.parent / "build.json", wheels / "llama-build.json")
    n = len(list(wheels.glob("*.whl")))
    say(f"wheels: {n} in {wheels} ({time.perf_counter() - t0:.0f} s; llama.cpp: {llama})")
    return llama


@dataclass
class ImageReport:
    """What was built: the tag, its size in bytes and how long each part took."""

    tag: str
    base: str
    size_bytes: int
    seconds: dict[str, float]


def build_image(
    opts: ImageOptions, cache_dir: Path, say: Callable[[str], None] = print
) -> ImageReport:
    """Base, wheels, then ``podman build`` with no network; returns the report."""
    check_tools()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    base = build_base(opts, say)
    times["base"] = time.perf_counter() - t0
    context = opts.work / "context"
    context.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llama = fetch_wheels(opts, context / "wheels", cache_dir, say)
    times["wheels"] = time.perf_counter() - t0
    llama_version = llama.name.split("-")[1]
    # The wheels reach the build through a volume, outside the context podman's layer cache
    # keys on: their digest, passed as a build argument, is what makes new wheels a new layer.
    digest = hashlib.sha256()
    for wheel in sorted((context / "wheels").iterdir()):
        digest.update(wheel.name.encode() + wheel.read_bytes())
    old = podman("image", "inspect", "--format", "{{.Id}}", opts.tag, check=False).stdout.strip()
    t0 = time.perf_counter()
    res = subprocess.run(
        [
            "podman",
            "build",
            "--network=none",
            "--pull=never",  # podman 4.3 takes --pull's value only after "="
            "--volume",
            f"{context / 'wheels'}:/wheels:ro",
            "--build-arg",
            f"BASE={base}",
            "--build-arg",
            f"VERSION={__version__}",
            "--build-arg",
            f"LLAMA_VERSION={llama_version}",
            "--build-arg",
            f"WHEELS_DIGEST={digest.hexdigest()}",
            "--label",
            f"org.opencontainers.image.version={__version__}",
            "--tag",
            opts.tag,
            "--file",
            str(CONTAINERFILE),
            str(context),
        ],
        env=podman_env(),
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise ImageError(f"podman build failed: {(res.stdout + res.stderr).strip()[-3000:]}")
    times["build"] = time.perf_counter() - t0
    shutil.rmtree(context / "wheels")
    new = podman("image", "inspect", "--format", "{{.Id}}", opts.tag).stdout.strip()
    if old and old != new:  # the image this tag named before, now untagged: not kept
        podman("rmi", old, check=False)
    size = int(podman("image", "inspect", "--format", "{{.Size}}", opts.tag).stdout.strip())
    say(f"image {opts.tag}: {size / 1e6:.0f} MB ({times['build']:.0f} s to build)")
    return ImageReport(opts.tag, base, size, times)
