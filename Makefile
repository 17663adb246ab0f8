# Entry points: `make run` (the main job: `dvc repro`), `make test` (the fast tier), `make test-all`
# (everything: what CI runs), `make lint`. Each builds .venv on first use.
# DVC stage commands call `python`, so the venv goes first on PATH.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test test-all lint bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[pipeline,postgres,test]'
	-$(PY) -m sasa build-ext  # optional: without a compiler the PyTorch kernel is used
	touch $@

run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

# the fast tier: no end-to-end pipeline, no real launcher, no server (tests marked slow)
test: install
	$(PY) -m pytest -m "not slow"

test-all: install
	$(PY) -m pytest

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

bench: install
	$(PY) -m benchmarks layer
	$(PY) -m benchmarks model
