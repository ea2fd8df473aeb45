# The README's two commands: `make serve` and `make test`. Both install into .venv with the pins
# of constraints.txt (torch and torchvision live there and nowhere else).
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
PIP := $(BIN)/pip install --disable-pip-version-check -q -c constraints.txt

.PHONY: serve serve-tiny test install install-test system-test-deps bench mutation

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

install: $(BIN)/python
	$(PIP) -e '.[service]'

install-test: $(BIN)/python
	$(PIP) -e '.[test]'

# Debian's Chromium drives the browser tests (never a browser download); Debian's docker-compose
# checks docker-compose.yml (`docker-compose config` needs no Docker engine).
system-test-deps:
	@command -v chromium >/dev/null && command -v docker-compose >/dev/null || \
		(apt-get update -qq && apt-get install -y -qq chromium docker-compose)

serve: install
	$(BIN)/upt serve

test: install-test system-test-deps
	$(BIN)/python -m pytest

# On demand, not part of `make test`: plants each curated bug of scripts/mutation.py in a copy of the
# tree and checks that a test fails (score and surviving mutants in the README).
mutation: install-test
	$(BIN)/python scripts/mutation.py

bench: install-test
	$(BIN)/python bench/text_truncation.py
	$(BIN)/python bench/serving.py
	$(BIN)/python bench/polling.py
	$(BIN)/python bench/encoder_runtimes.py
	$(BIN)/python bench/misses.py
	$(BIN)/python bench/serving_load.py
	$(BIN)/python bench/first_answer.py
	$(BIN)/python bench/instant_stage.py

# Offline demo: the project's tiny backbone pretrained here on Fashion-MNIST (scripts/pretrain_tiny.py),
# named explicitly (never a silent fallback). It knows clothes in 32-pixel greyscale, nothing else.
TINY_WEIGHTS := upt/weights/upt-tiny-fashion-mnist.safetensors
serve-tiny: install
	UPT_MODEL=upt-tiny UPT_PRETRAINED=$(TINY_WEIGHTS) $(BIN)/upt serve
