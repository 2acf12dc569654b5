# VFlowOpt developer tasks. Everything (torch included) is installed into .venv by the `.venv` target.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch goes in first, on its own, so that resolving the other requirements never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.install.stamp

.PHONY: .venv test run lint

.venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

test: .venv
	$(BIN)/python -m pytest -q

run: .venv
	$(BIN)/vflowopt run

lint: .venv
	$(BIN)/ruff check src tests
