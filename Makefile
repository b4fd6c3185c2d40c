# The README's two commands: `make run` and `make test`. Both build .venv when it is missing or
# older than the dependency list, and do nothing slow otherwise.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run demo test test-slow lint format services bench bench-model bench-api clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch and torchvision come from this machine's local wheels (pip only; see README).
	$(PY) -m pip install --quiet -e '.[service,dev]'
	touch $(STAMP)

install: $(STAMP)

# The embedded service: SQLite and a bundled Redis under ./var, one worker, the API on
# 127.0.0.1:$${JUMPOUT_PORT:-8000}. Ctrl-C stops everything cleanly.
run: $(STAMP)
	$(PY) -m launcher

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

# Everything but the fault-injection tests marked `slow` (those run in `make test-slow`, and in CI).
test: $(STAMP) services lint
	$(PY) -m pytest -m "not slow"

test-slow: $(STAMP) services
	$(PY) -m pytest -m slow

bench: $(STAMP)
	$(PY) benchmarks/layer.py

bench-model: $(STAMP)
	$(PY) benchmarks/model_step.py

bench-api: $(STAMP)
	$(PY) benchmarks/api.py

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
