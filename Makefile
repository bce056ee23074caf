VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint bench run

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml deploy/install.sh
	bash deploy/install.sh
	touch $@

run: install
	$(VENV)/bin/voicefoundry doctor

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) tests/bench/bench_foundation.py
