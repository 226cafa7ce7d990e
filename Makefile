# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Each sets up everything it needs on a fresh machine: a virtual environment, the package,
# and the embedded Fashion-MNIST dataset (Debian package dataset-fashion-mnist -> TFDS).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test lint data clean-demo

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

data: $(VENV)/.installed
	$(PY) -m rare_jax.data.prepare

demo: data
	$(PY) -m rare_jax.run --config=experiments/configs/demo.py --workdir=$(WORKDIR)

test: data
	$(PY) -m ruff check rare_jax experiments tests benchmarks
	$(PY) -m pytest -n 2 --durations=15 tests

lint: $(VENV)/.installed
	$(PY) -m ruff check rare_jax experiments tests benchmarks
