# The README's two commands: `make run` and `make test`. Both build .venv when it is missing or
# older than the dependency list, and do nothing slow otherwise.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run demo test test-slow test-browser test-container lint format services bench bench-model bench-api clean

# One line per step instead of pip's wall of text (the steps stay --quiet; errors still show).
$(STAMP): pyproject.toml
	@echo "building .venv (first run, or pyproject.toml changed; about 1-2 minutes)..."
	@test -x $(PY) || { echo "  1/3 creating the virtual environment"; $(PYTHON) -m venv $(VENV); }
	@echo "  2/3 upgrading pip"
	@$(PY) -m pip install --quiet --upgrade pip
	@# torch and torchvision come from this machine's local wheels (pip only; see README).
	@echo "  3/3 installing jumpout and its dependencies (torch is the long part)"
	@$(PY) -m pip install --quiet -e '.[service,client,dev]'
	@touch $(STAMP)
	@echo ".venv is ready"

install: $(STAMP)

# The embedded service: SQLite and a bundled Redis under ./var, one worker, the API on
# 127.0.0.1:$${JUMPOUT_PORT:-8000}. Ctrl-C stops everything cleanly.
# `make run VERBOSE=1`: the children's output in the terminal too (JUMPOUT_VERBOSE).
run: $(STAMP)
	@$(if $(VERBOSE),JUMPOUT_VERBOSE=1 )$(PY) -m launcher

demo: $(STAMP)
	$(PY) -m jumpout demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# PostgreSQL and Redis on 127.0.0.1 for the integration tests; started only if not answering.
services:
	scripts/ensure-services.sh

# Everything but the fault-injection tests marked `slow` (those run in `make test-slow`, and in CI),
# the browser tests (`make test-browser`) and the Docker one (`make test-container`).
test: $(STAMP) services lint
	$(PY) -m pytest -m "not slow and not browser and not container" --durations=15

test-slow: $(STAMP) services
	$(PY) -m pytest -m slow

# The dashboard in a headless Chromium (Debian's chromium + chromium-driver, installed with
# apt-get by the tests when missing); saves a screenshot of each page to docs/screenshots/.
test-browser: $(STAMP) services
	$(PY) -m pytest -m browser tests/browser

# docker-compose.yml built and run for real (README, "The team deployment"): as root on Debian;
# installs Docker with apt-get and builds local base images the first time (scripts/prepare-docker-host).
test-container: $(STAMP)
	$(PY) -m pytest -m container tests/container

bench: $(STAMP)
	$(PY) benchmarks/layer.py

bench-model: $(STAMP)
	$(PY) benchmarks/model_step.py

bench-api: $(STAMP)
	$(PY) benchmarks/api.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
