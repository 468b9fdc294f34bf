# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= $(if $(CIFAR_ROOT),$(CIFAR_ROOT),$(if $(wildcard ../shared/data/cifar-10-batches-py),../shared/data,./data))

.PHONY: venv demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m training.train --model efficientnet_lite0 --dataset cifar10 --data-dir $(DATA_DIR) \
		--strategy frozen --epochs 15 --name demo-efficientnet_lite0 --resume --synthetic-fallback

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs artifacts reports .pytest_cache
