# The two commands: `make serve` (run lmlink on its built-in model) and `make test`.
# Both set everything up on first use: Debian packages (when root), a virtualenv, the package.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
# MLX's CPU build ships a slow reference BLAS; Debian's OpenBLAS is much faster (Linux only).
OPENBLAS := $(firstword $(wildcard /usr/lib/*/openblas-pthread/libblas.so.3))
# One BLAS thread: the engine already keeps a second core busy (measured faster on 2 cores).
RUN_ENV := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) OPENBLAS_NUM_THREADS=1)

.PHONY: setup serve test bench proto clean tailnet-tools rebuild-builtin

$(STAMP): pyproject.toml scripts/system-packages.txt
	./scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	touch $(STAMP)

setup: $(STAMP)

serve: setup
	$(RUN_ENV) $(VENV)/bin/lmlink serve $(ARGS)

# headscale + tailscaled + tailscale for the real-tailnet tests (tools/tailnet/go.mod), built
# once per machine into ~/.cache/lmlink/tailnet-tools (needs Go 1.26+); instant when cached.
tailnet-tools:
	./scripts/build-tailnet-tools.sh >/dev/null

test: setup tailnet-tools
	HF_HUB_OFFLINE=1 $(RUN_ENV) $(PY) -m pytest -q $(ARGS)

bench: setup
	HF_HUB_OFFLINE=1 $(RUN_ENV) $(PY) bench/run.py $(ARGS)

# Rebuild the shipped toy model from data/corpus in a scratch dir and compare byte for byte
# (the script pins BLAS threads and kernel itself; ~10 min idle, ~30 min on a busy 2-core VM).
# `make test` checks the same build up to its first checkpoint (tests/test_builtin_model.py).
rebuild-builtin: setup
	$(PY) scripts/build_builtin_model.py --check lmlink/engine/builtin_model

proto: setup
	PYTHON=$(PY) ./scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
