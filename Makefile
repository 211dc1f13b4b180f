# Two commands for a new user: `make quickstart` and `make test`.
# Everything is installed into .venv from constraints.txt, in a fixed order:
#   1. the tested dependency set (torch, hydra, classy-vision's deps, ...)
#   2. vissl==0.1.6 with --no-deps (its own pins do not install on Python 3.11)
#   3. classy-vision==0.7.0 with --no-deps over the copy VISSL's wheel bundles
#   4. this package
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
PIP    := $(VPY) -m pip --disable-pip-version-check -q
SRC    := $(shell find swav_vissl_plugin configs hydra_plugins -name '*.py' -o -name '*.yaml') setup.py README.md
PYTEST_ARGS ?=

.PHONY: install quickstart test test-slow bench clean

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(VENV)/.deps: constraints.txt requirements.txt | $(VPY)
	$(PIP) install -c constraints.txt -r requirements.txt
	$(PIP) install --no-deps vissl==0.1.6
	$(PIP) install --no-deps --force-reinstall classy-vision==0.7.0
	touch $@

$(VENV)/.installed: $(VENV)/.deps $(SRC)
	$(PIP) install --no-deps --no-build-isolation .
	rm -rf build
	touch $@

install: $(VENV)/.installed

quickstart: install
	$(VPY) tools/quickstart.py

test: install
	$(VENV)/bin/pytest -q $(PYTEST_ARGS) tests

# Tests marked `slow` (pytest.ini deselects them from `make test`); CI runs both.
test-slow: install
	$(VENV)/bin/pytest -q -m slow $(PYTEST_ARGS) tests

bench: install
	$(VPY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info output
