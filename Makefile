# Two entry points: `make run` (the main job) and `make test`. Both build .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test bench install

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

run: install
	$(PY) -m sasa table --resolution 224

test: install
	$(PY) -m pytest

bench: install
	$(PY) -m benchmarks.layer
