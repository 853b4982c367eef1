# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The statsmodels fits are tiny; BLAS threads only contend for the cores.
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install demo test test-fast test-servers lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The bundled trace slice through the services on an embedded NATS; writes demo.png here.
demo: $(STAMP)
	$(BIN)/slaplanner demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Integration tests run a real Prometheus (Debian's package) when no Docker engine answers.
test-servers:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus; }

test: lint test-servers
	$(BIN)/pytest

# The tests that need no server or process (tests/conftest.py marks the others): under a minute.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not servers" -q

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
