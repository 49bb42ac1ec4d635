#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the llama-cpp-python sdist we
# pin, once, into the cache (outside the repository). It is a peer to measure against in
# benchmarks, never a dependency of serving. Prints the binary's path.
# It is built with the CMake arguments and C flags of the installed llama-cpp-python's build
# record (.venv/llama-build.json, written by `make`): the same kernels on both sides, and none of
# the extensions this host's probes found unsafe (see src/allinone/llama_build.py).
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${ALLINONE_CACHE_DIR:-$HOME/.cache/allinone}
py=${PYTHON:-.venv/bin/python}
plan=$("$py" -c 'import json, sys; from allinone.backends.host_check import build_record
p = (build_record() or {}).get("plan") or {}
print(p.get("cmake_args") or "-DGGML_NATIVE=ON"); print(p.get("cflags") or "")')
cmake_args=$(sed -n 1p <<<"$plan")
cflags=$(sed -n 2p <<<"$plan")
key=$( (uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true; echo "$plan") | md5sum | cut -c1-10)
dest="$cache/llama-server/$version-$key"
if [ -x "$dest/llama-server" ]; then
  echo "$dest/llama-server"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m pip download -q --no-deps --no-binary llama-cpp-python "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
src="$work/llama_cpp_python-$version/vendor/llama.cpp"
echo "building llama-server from $src ($cmake_args, CFLAGS '$cflags'; ~6 min on 2 cores, once)" >&2
# shellcheck disable=SC2086  # cmake_args is a list of -D options
CFLAGS="$cflags" CXXFLAGS="$cflags" cmake -S "$src" -B "$work/build" $cmake_args \
  -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/"
echo "$dest/llama-server"
