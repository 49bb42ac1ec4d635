#!/usr/bin/env bash
# Build llama.cpp's own llama-server from the sources vendored in the llama-cpp-python sdist we
# pin, once, into the cache (outside the repository). It is a peer to measure against in
# benchmarks, never a dependency of serving. Prints the binary's path.
set -euo pipefail
version=${LLAMA_CPP_PYTHON_VERSION:-0.3.36}
cache=${ALLINONE_CACHE_DIR:-$HOME/.cache/allinone}
key=$( (uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true) | md5sum | cut -c1-10)
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
echo "building llama-server from $src (about 6 minutes on 2 cores, once)" >&2
cmake -S "$src" -B "$work/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_SERVER=ON \
  -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_CURL=OFF >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$dest"
cp "$work/build/bin/llama-server" "$dest/"
echo "$dest/llama-server"
