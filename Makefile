VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install test lint bench run serve

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml deploy/install.sh
	bash deploy/install.sh
	touch $@

serve: install
	$(VENV)/bin/voicefoundry serve --demo --data-dir ./data

run: install
	$(VENV)/bin/voicefoundry doctor

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) tests/bench/bench_foundation.py
	$(PY) tests/bench/bench_finetune.py
	$(PY) tests/bench/bench_service.py
