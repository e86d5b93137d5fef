# Set-up and checks. Everything runs inside .venv; torch is installed first and pinned, so pip
# never pulls another build.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.13.0

.PHONY: install install-dev demo test test-slow bench-quick lint format

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[samples]"

install-dev: $(BIN)/python
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e ".[dev]"

demo: install
	$(BIN)/mmllm weights install smollm2-135m-instruct
	$(BIN)/mmllm ask sample:easy-vqa-test-0 "what is the color of the shape?"

test: install-dev
	$(BIN)/pytest -m "not slow"

test-slow: install-dev
	$(BIN)/pytest -m slow

bench-quick: install-dev
	$(BIN)/mmllm weights install smollm2-135m-instruct
	$(BIN)/python benchmarks/data_throughput.py --quick
	$(BIN)/python benchmarks/train_throughput.py --quick
	$(BIN)/python benchmarks/latency.py --quick
	$(BIN)/python benchmarks/serve_load.py --quick
	$(BIN)/python benchmarks/inference.py --quick
	$(BIN)/python benchmarks/int8_gemv.py --quick

lint: install-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install-dev
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
