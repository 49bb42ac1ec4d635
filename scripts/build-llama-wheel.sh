#!/usr/bin/env bash
# Build llama-cpp-python once into a wheelhouse outside the repository and reuse it afterwards.
# llama.cpp is compiled for the CPU it is built on (GGML_NATIVE), so the wheelhouse is keyed by
# the CPU's architecture and feature flags: another kind of CPU gets its own build.
set -euo pipefail
py=${1:?usage: build-llama-wheel.sh PYTHON WHEELHOUSE VERSION}
house=${2:?}
version=${3:?}
key=$( (uname -m; grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || true) | md5sum | cut -c1-10)
dir="$house/$key"
if ls "$dir"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
  echo "$dir"
  exit 0
fi
mkdir -p "$dir"
echo "building llama-cpp-python $version from source (about 5-9 minutes on 2 cores, once)" >&2
"$py" -m pip wheel --no-deps -q "llama-cpp-python==$version" -w "$dir" >&2
echo "$dir"
