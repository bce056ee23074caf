VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install postgres deploy-checks test lint parity browser bench run serve

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml clients/python/pyproject.toml deploy/install.sh
	bash deploy/install.sh
	touch $@

serve: install
	$(VENV)/bin/voicefoundry serve --demo --data-dir ./data

run: install
	$(VENV)/bin/voicefoundry doctor

# PostgreSQL (Debian's cluster) for the registry's PostgreSQL tests: started when it is down.
postgres:
	bash deploy/start-postgres.sh

# docker-compose, nginx, systemd-analyze for tests/scale/test_deploy_files.py: installed when missing.
deploy-checks:
	bash deploy/install-deploy-checks.sh

test: install postgres
	$(PY) -m pytest -q --durations=25

# The long end-to-end proofs (each overfits voices through real jobs on a real server, then
# checks that /speak serves them exactly as trained; every layout and variant trained and served):
# minutes each, so their own group, which .ci/run runs after `make test`.
e2e: install
	$(PY) -m pytest -q tests/e2e

# Beyond one process: PostgreSQL-backed servers, replicas, data-parallel training over
# mx.distributed, the deploy files checked by their own tools. Its own group (like parity and
# browser) because each test starts several processes; .ci/run runs it.
scale: install postgres deploy-checks
	$(PY) -m pytest -q tests/scale

PARITY_VENV ?= .venv-parity

$(PARITY_VENV)/.installed: deploy/parity-requirements.txt deploy/install-parity.sh
	VF_PARITY_VENV=$(PARITY_VENV) bash deploy/install-parity.sh
	touch $@

# Our checkpoints loaded by the reference implementations (qwen-tts, moshi) on PyTorch CPU.
parity: install $(PARITY_VENV)/.installed
	$(PARITY_VENV)/bin/python -m pytest -q --confcutdir=tests/parity tests/parity

BROWSER_STAMP := $(VENV)/.browser-installed

$(BROWSER_STAMP): $(VENV)/.installed deploy/install-browser.sh pyproject.toml
	bash deploy/install-browser.sh
	touch $@

# The web console in a real headless Chromium against a real `serve --demo` process; screenshots
# land in tests/browser/artifacts/.
browser: install $(BROWSER_STAMP)
	$(PY) -m pytest -q tests/browser

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m mypy

bench: install
	$(PY) tests/bench/bench_foundation.py
	$(PY) tests/bench/bench_finetune.py
	$(PY) tests/bench/bench_service.py
	$(PY) tests/bench/bench_vocoder.py
