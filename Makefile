# One command per job. `make test` builds .venv from nothing (pinned by constraints.txt) and runs pytest;
# `make test-fast` is the inner loop while editing (a subset, minutes); `make test` is what CI runs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test test-fast lint setup clean demo fashion-mnist

setup: $(STAMP)

# Reinstall only when the declared dependencies or the pins change: a second `make test` installs nothing.
# PYTHONWARNINGS hides the one note setuptools prints for every flat-layout editable install (folders named
# like the packages take precedence: that is how this repository is meant to be imported); deprecations show.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	PYTHONWARNINGS="ignore:Editable installation:UserWarning" $(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

# tests/test_demo.py runs the demo on real Fashion-MNIST, so `make test` needs it as much as `make demo`.
test: fashion-mnist $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The inner loop: the tests marked `fast`, a list kept in tests/fast_subset.py (unit tests of every module
# and one tiny run per stage; not the process-killing, torchrun, fresh-interpreter or real-data tests), so
# it needs no Fashion-MNIST. `make test-fast PYTEST_ARGS=--touched-modules` also checks that it runs a
# function of every module under pipeline/, storage/ and student/. Before a commit, still run `make test`.
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m fast $(PYTEST_ARGS)

# The README's first command: set up, make sure Fashion-MNIST is here, run the whole pipeline on it.
demo: fashion-mnist $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python cli.py demo

# Debian's dataset-fashion-mnist package: installed when we are root, else one line saying how, exit 2.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
fashion-mnist:
	@test -f $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist || \
	    { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	  else echo "Fashion-MNIST is missing: install it with  sudo apt-get install -y dataset-fashion-mnist  then rerun make $(MAKECMDGOALS)" >&2; exit 2; fi; }

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
