# Two quickstart commands: `make demo` and `make test`. Both create .venv if missing.
# torch is installed first and pinned to the CPU wheel, so the open `torch>=2.6` range in
# pyproject.toml is already satisfied and never pulls a multi-GB CUDA build.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test install lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,plot,cpu,hf,serve,onnx,compress]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/scalelm train --out runs/demo --train.time_budget_min 4.8 --train.steps 2000 --train.compile true --train.eval_every 0
	$(BIN)/scalelm generate runs/demo --prompt "ROMEO:" --max-new-tokens 300

test: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	$(BIN)/python bench/train_throughput.py

clean:
	rm -rf runs .pytest_cache
