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

# `make demo` knobs (`make demo-small` overrides them for CI's reduced run).
DEMO_MODEL ?= efficientnet_lite0
DEMO_NAME ?= demo-$(DEMO_MODEL)
DEMO_TRAIN ?= --strategy frozen --epochs 15
DEMO_FORMATS ?= fp32 fp16 int8
DEMO_SERVE ?= int8 fp32
DEMO_LOAD ?= --scenarios single server offline --users 1 4 --single-seconds 5 --step-seconds 5 \
	--warmup-seconds 2 --offline-batch 16 --slo-ms 250
RUNS_DIR ?= runs
ARTIFACTS_DIR ?= artifacts
REPORTS_DIR ?= reports
PAYLOADS := $(if $(wildcard $(DATA_DIR)/cifar-10-batches-py/test_batch),cifar:$(DATA_DIR),synthetic)
# served names: the first format is the model name itself (the service's default), the others get a suffix
DEMO_MODELS := $(foreach f,$(DEMO_SERVE),$(DEMO_MODEL)$(if $(filter $(f),$(firstword $(DEMO_SERVE))),,-$(f))=$(DEMO_NAME)-$(f):latest)
comma := ,
empty :=
space := $(empty) $(empty)

# Train (ImageNet Lite0, frozen backbone, cached features), export FP32/FP16/INT8 into the BentoML
# store, build a bento that packs the served models, serve it on loopback and load-test it briefly
# (report in reports/latest/). Training and export skip finished work.
demo: $(STAMP)
	$(BIN)/python -m training.train --model $(DEMO_MODEL) --dataset cifar10 --data-dir $(DATA_DIR) \
		$(DEMO_TRAIN) --name $(DEMO_NAME) --runs-dir $(RUNS_DIR) --resume --synthetic-fallback
	$(BIN)/python -m export $(RUNS_DIR)/$(DEMO_NAME) --out $(ARTIFACTS_DIR)/$(DEMO_NAME) --formats $(DEMO_FORMATS)
	CIFAR_DEPLOY_MODELS="$(subst $(space),$(comma),$(DEMO_MODELS))" $(BIN)/bentoml build
	$(BIN)/python -m loadtest.run --bento cifar-deploy:latest --models $(DEMO_MODELS) \
		--payload-source $(PAYLOADS) --reports-dir $(REPORTS_DIR) $(DEMO_LOAD)
	@echo
	@echo "run:       $(RUNS_DIR)/$(DEMO_NAME)/ (metrics.json, model.json, curves.png, confusion.png, samples.png)"
	@echo "artifacts: $(ARTIFACTS_DIR)/$(DEMO_NAME)/ (manifest.json, model*.onnx)"
	@echo "load test: $(REPORTS_DIR)/latest/report.md"
	@echo "serve:     CIFAR_DEPLOY_MODELS=\"$(subst $(space),$(comma),$(DEMO_MODELS))\" $(BIN)/bentoml serve cifar-deploy:latest --port 3000"
	@echo "try:       curl -F image=@some.png 'http://127.0.0.1:3000/classify?top_k=3'"

# The same chain in a minute: a tiny scratch CNN on a slice of the data, INT8 only, seconds of load (CI runs it).
demo-small:
	$(MAKE) demo DEMO_MODEL=scratch_cnn DEMO_NAME=demo-small \
		DEMO_TRAIN="--strategy full --weights none --epochs 1 --limit-train 256 --limit-test 128" \
		DEMO_FORMATS="fp32 int8" DEMO_SERVE="int8" \
		DEMO_LOAD="--scenarios single offline --single-seconds 2 --warmup-seconds 1 --offline-batch 8 --offline-users 1"

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
