# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= $(if $(CIFAR_ROOT),$(CIFAR_ROOT),$(if $(wildcard ../shared/data/cifar-10-batches-py),../shared/data,./data))

.PHONY: venv demo demo-small study test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# `make demo` runs the chain on configs/demo.yaml, one section per stage: train (ImageNet Lite0, frozen
# backbone, cached features), export FP32/FP16/INT8 into the BentoML store, build a bento that packs the
# served models, serve it on loopback and load-test it briefly (reports/latest/). Finished work is reused.
DEMO ?= configs/demo.yaml
PAYLOADS := $(if $(wildcard $(DATA_DIR)/cifar-10-batches-py/test_batch),cifar:$(DATA_DIR),synthetic)

demo: $(STAMP)
	$(BIN)/python -m training.train --config $(DEMO) --data-dir $(DATA_DIR)
	$(BIN)/python -m export --config $(DEMO)
	CIFAR_DEPLOY_CONFIG=$(DEMO) $(BIN)/bentoml build
	$(BIN)/python -m loadtest.run --config $(DEMO) --payload-source $(PAYLOADS)
	@echo
	@echo "config:    $(DEMO) (runs/, artifacts/ and reports/ paths are set there)"
	@echo "load test: reports/latest/report.md (or the reports_dir of $(DEMO))"
	@echo "serve:     CIFAR_DEPLOY_CONFIG=$(abspath $(DEMO)) $(BIN)/bentoml serve cifar-deploy:latest --port 3000"
	@echo "try:       curl -F image=@some.png -F top_k=3 http://127.0.0.1:3000/classify"

# The same chain in a minute: a tiny scratch CNN on a slice of the data, INT8 only, seconds of load (CI runs it).
demo-small:
	$(MAKE) demo DEMO=configs/demo-small.yaml

# The seeds' study (benchmarks/study.py): the full config on a GPU host, the reduced one on a CPU.
STUDY ?= $(if $(shell command -v nvidia-smi 2>/dev/null),configs/seeds.yaml,configs/cpu-small.yaml)
study: $(STAMP)
	$(BIN)/python -m benchmarks.study $(STUDY) $(if $(CIFAR_ROOT),--data-dir $(CIFAR_ROOT),)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs artifacts reports studies .pytest_cache
