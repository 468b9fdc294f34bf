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

DEMO_RUN := runs/demo-efficientnet_lite0
PAYLOADS := $(if $(wildcard $(DATA_DIR)/cifar-10-batches-py/test_batch),cifar:$(DATA_DIR),synthetic)

# Train (ImageNet Lite0, frozen backbone, cached features), export FP32/FP16/INT8 into the BentoML
# store, build the bento that service/config.yaml describes, serve it on loopback and load-test it
# briefly (report in reports/latest/). Training and export skip finished work.
demo: $(STAMP)
	$(BIN)/python -m training.train --model efficientnet_lite0 --dataset cifar10 --data-dir $(DATA_DIR) \
		--strategy frozen --epochs 15 --name demo-efficientnet_lite0 --resume --synthetic-fallback
	$(BIN)/python -m export $(DEMO_RUN) --formats fp32 fp16 int8
	$(BIN)/bentoml build
	$(BIN)/python -m loadtest.run --bento cifar-deploy:latest \
		--models efficientnet_lite0=demo-efficientnet_lite0-int8:latest efficientnet_lite0-fp32=demo-efficientnet_lite0-fp32:latest \
		--payload-source $(PAYLOADS) --scenarios single server offline --users 1 4 --single-seconds 5 \
		--step-seconds 5 --warmup-seconds 2 --offline-batch 16 --slo-ms 250
	@echo
	@echo "run:       $(DEMO_RUN)/ (metrics.json, model.json, curves.png, confusion.png, samples.png)"
	@echo "artifacts: artifacts/demo-efficientnet_lite0/ (manifest.json, model*.onnx)"
	@echo "load test: reports/latest/report.md"
	@echo "serve:     $(BIN)/bentoml serve service.service:CifarClassifier --port 3000"
	@echo "try:       curl -F image=@some.png 'http://127.0.0.1:3000/classify?top_k=3'"

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs artifacts reports .pytest_cache
