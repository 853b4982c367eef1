# The two commands of the README: `make demo` and `make test`. Each creates .venv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# The statsmodels fits are tiny; BLAS threads only contend for the cores.
export OPENBLAS_NUM_THREADS ?= 1
export OMP_NUM_THREADS ?= 1

.PHONY: install lock demo test test-fast test-servers lint bench clean

# Every package comes from the lock files, each file checked against its hash: pip, the build
# backend (build.lock), the project's and the tests' dependencies (dev.lock); then the project
# itself, with nothing more fetched. `make lock` writes the locks again (see below).
$(STAMP): pyproject.toml requirements/build.lock requirements/dev.lock
	$(PYTHON) -c 'import sys; sys.exit("Python 3.11+ is required" if sys.version_info < (3, 11) else 0)'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/build.lock
	$(BIN)/python -m pip install --quiet --require-hashes --no-deps -r requirements/dev.lock
	$(BIN)/python -m pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

install: $(STAMP)

# The locks, from pyproject.toml's ranges, keeping the versions they hold unless asked to move
# (UV_ARGS=--upgrade, or --upgrade-package NAME). Needs uv (`pip install uv` anywhere). Every
# file PyPI has of a pinned version is hashed, so the locks install on any platform.
UV ?= uv
LOCK_ARGS = --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	--no-header --quiet $(UV_ARGS)
lock:
	$(UV) pip compile pyproject.toml --extra dev $(LOCK_ARGS) -o requirements/dev.lock
	$(UV) pip compile pyproject.toml $(LOCK_ARGS) -o requirements/runtime.lock
	$(UV) pip compile requirements/build.in $(LOCK_ARGS) -o requirements/build.lock

# The bundled trace slice through the services on an embedded NATS; writes demo.png here.
demo: $(STAMP)
	$(BIN)/slaplanner demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# Integration tests run a real Prometheus (Debian's package) when no Docker engine answers.
# The version is pinned: Debian 12's, the one the integration tests were written against.
PROMETHEUS_DEB ?= 2.42.0+ds-5+deb12u1
test-servers:
	@command -v prometheus >/dev/null 2>&1 || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends \
	    prometheus=$(PROMETHEUS_DEB); }

# Two workers (pytest-xdist): most tests wait on servers and subprocesses, so two share a 2-core
# machine well. A file's tests stay on one worker, so its module fixtures start once.
PYTEST_WORKERS ?= 2
test: lint test-servers
	$(BIN)/pytest -n $(PYTEST_WORKERS) --dist loadfile

# The tests that need no server or process (tests/conftest.py marks the others): under a minute.
test-fast: $(STAMP)
	$(BIN)/pytest -m "not servers" -q

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
