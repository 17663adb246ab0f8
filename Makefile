# Two entry points: `make run` (the main job: `dvc repro`) and `make test`. Both build .venv on first use.
# DVC stage commands call `python`, so the venv goes first on PATH.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[pipeline,test]'
	-$(PY) -m sasa build-ext  # optional: without a compiler the PyTorch kernel is used
	touch $@

run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" dvc repro

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks layer
	$(PY) -m benchmarks model
