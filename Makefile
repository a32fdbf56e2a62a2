# Two commands (README): `make run` and `make test`. Both create the virtual environment first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

export PATH := $(abspath $(BIN)):$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_HOME ?= $(abspath .prefect)
export PREFECT_LOGGING_LEVEL ?= WARNING
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup run repro test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## The main job on the embedded default: the Prefect flow `optimize` (DVC data + export, engines,
## evaluation, MLflow, promotion), then the summary.
run: setup
	$(BIN)/python -m flows.optimize
	$(BIN)/ssdopt summary

## The same stages through DVC alone (no Prefect, no MLflow): dvc.yaml.
repro: setup
	$(BIN)/dvc repro

## Lint and the whole test suite.
test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

clean:
	rm -rf build artifacts reports
