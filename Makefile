# One command per job. `make test` builds .venv from nothing (pinned by constraints.txt) and runs pytest.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test lint setup clean demo

setup: $(STAMP)

# Reinstall only when the declared dependencies or the pins change: a second `make test` installs nothing.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The README's first command: set up, make sure Fashion-MNIST is here, run the whole pipeline on it.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
demo: $(STAMP)
	@test -f $(FASHION_MNIST) || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get install -y dataset-fashion-mnist || \
	    { apt-get update && apt-get install -y dataset-fashion-mnist; }; \
	  else echo "Fashion-MNIST is missing: install it with  sudo apt-get install -y dataset-fashion-mnist  then rerun make demo" >&2; exit 2; fi; }
	HF_HUB_OFFLINE=1 $(BIN)/python cli.py demo

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
