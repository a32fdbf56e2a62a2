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
# These machines set PYTHONDONTWRITEBYTECODE=1. With it, every process (each CLI call, server and worker
# the tests start) compiles torch's modules from source again: CI tests took 17.5 min instead of 11.9. Empty,
# Python writes each module's .pyc once, on first import; so pip need not compile torch's 15k files up front.
export PYTHONDONTWRITEBYTECODE :=
ifneq ($(wildcard /usr/local/cuda/bin/nvcc),)
export CUDA_HOME ?= /usr/local/cuda
endif

.PHONY: setup run repro test flakes lint clean infra-up infra-down

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -qq --no-compile -e '.[dev]'  # -qq: errors only (the registry's config warns per package)
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
	$(BIN)/pytest -q --durations=25

## The fault, soak and flow tests RUNS times in a row (flakes show as a pass count below RUNS).
RUNS ?= 5
flakes: setup
	@passed=0; for i in $$(seq $(RUNS)); do \
	  if $(BIN)/pytest -q tests/reliability tests/flows >/tmp/ssdopt-flakes-$$i.log 2>&1; \
	  then passed=$$((passed + 1)); echo "run $$i: passed ($$(tail -1 /tmp/ssdopt-flakes-$$i.log))"; \
	  else echo "run $$i: FAILED (log: /tmp/ssdopt-flakes-$$i.log)"; fi; done; \
	echo "$$passed of $(RUNS) runs passed"; test $$passed -eq $(RUNS)

## A team's servers on loopback (PostgreSQL, S3 via moto, MLflow with basic auth, Prefect), the code
## tests/infra runs (ssdopt/infra.py); prints the variables to export. State and logs: $(INFRA).
INFRA ?= .infra
infra-up: setup
	$(BIN)/python -m ssdopt.infra up $(INFRA)

infra-down: setup
	$(BIN)/python -m ssdopt.infra down $(INFRA)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check . || true

clean:
	rm -rf build artifacts reports
