# The two commands of the README: `make demo` and `make test`. Only Python 3 (with its venv
# module: python3-venv on Debian/Ubuntu) and make needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: demo test lint bench clean

# A failed venv (no ensurepip) is removed, or the next make would take it for a good one.
$(BIN)/python:
	@$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "make: '$(PYTHON) -m venv' failed: install Python's venv module" \
	       "(Debian/Ubuntu: apt install python3-venv) or set PYTHON=..." >&2; exit 1; }

$(VENV)/.demo: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[demo,cli]'
	touch $@

$(VENV)/.test: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[test]' $(EXTRA_PIP)
	touch $@

$(VENV)/.dev: pyproject.toml | $(BIN)/python
	$(PIP) install -e '.[dev]'
	touch $@

demo: $(VENV)/.demo
	$(BIN)/pgleakguard demo examples/psycopg_pool_leak.py

test: $(VENV)/.test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(VENV)/.test
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/diagnose.py
	$(BIN)/python benchmarks/pytest_plugin.py
	$(BIN)/python benchmarks/django_request.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
