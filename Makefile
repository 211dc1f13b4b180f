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

.PHONY: install quickstart test test-slow test-numerics bench clean

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

# The tests whose assertions compare floats, again on other float kernels:
# ATen's portable (non-vectorised) kernels and one thread, so other summation
# orders and exp/log implementations than `make test` ran. Their tolerances
# are derived from the computation (tests/tolerances.py) to hold on any CPU.
NUMERIC_TESTS := tests/test_sinkhorn.py tests/test_swav_loss.py tests/test_swav_loss_distributed.py \
	tests/test_world_size.py tests/test_clustering.py tests/test_clustering_distributed.py \
	tests/test_larc.py tests/test_schedule.py tests/test_scaling.py tests/test_knn.py \
	tests/test_monitoring.py tests/test_gallery.py tests/test_checkpoints.py tests/test_transforms.py \
	tests/test_e2e_trainer.py tests/test_deepcluster_e2e.py tests/test_train_step.py \
	tests/test_benchmarks.py::test_bench_loss_tiny_runs_and_implementations_agree \
	tests/test_benchmarks.py::test_release_formulas_equal_plugin_at_recipe_shape_with_queue \
	tests/test_benchmarks.py::test_bench_larc_tiny_runs_and_steps_agree \
	tests/test_benchmarks.py::test_bench_small_run_tiny_runs_and_memory_formats_agree
test-numerics: install
	ATEN_CPU_CAPABILITY=default OMP_NUM_THREADS=1 $(VENV)/bin/pytest -q $(PYTEST_ARGS) $(NUMERIC_TESTS)

bench: install
	$(VPY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info output
