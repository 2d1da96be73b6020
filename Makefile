# Sekisho: `make run` serves the gateway locally, `make test` runs every test.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: run test bench soak setup clean

setup: $(STAMP) $(NODE_STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	@$(PYTHON) -c 'import sys; assert sys.version_info[:2] == (3, 11), "Sekisho needs Python 3.11 (Azure Functions 1.x line)"'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

run: $(STAMP)
	$(PY) -m shared.local.host

test: $(STAMP) $(NODE_STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) bench/gateway_vs_direct.py

soak: $(STAMP)
	$(PY) bench/soak.py

clean:
	rm -rf $(VENV) node_modules .data .pytest_cache test-artifacts bench/.litellm-venv
