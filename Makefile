# Set-up and checks. Everything runs inside .venv; torch and its torchvision are installed first and
# pinned, so pip never pulls another build (timm, for the photo model's tower, needs torchvision).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH := torch==2.14.1 torchvision==0.29.1

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
	$(BIN)/mmllm ask sample:chelsea "What animal is this?"

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
