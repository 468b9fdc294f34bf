# The two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATA_DIR ?= $(if $(CIFAR_ROOT),$(CIFAR_ROOT),$(if $(wildcard ../shared/data/cifar-10-batches-py),../shared/data,./data))

.PHONY: venv demo demo-small ship study soak test lint clean gpu-check _gpu-check browser

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[cpu,dev,openvino]'
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

# The Lite0 that ships (configs/lite0-ship.yaml): its base stage (full fine-tune at 160 px with EMA, about
# 23-29 minutes of training on a 2-core CPU with bf16: AMX/AVX512-BF16), then the same chain as `make demo` on
# the shipped stage, which learns the serving path from the base model as its teacher.
ship: $(STAMP)
	$(BIN)/python -m training.train --config configs/lite0-ship.yaml --section base --data-dir $(DATA_DIR)
	$(MAKE) demo DEMO=configs/lite0-ship.yaml

# The seeds' study (benchmarks/study.py): the full config on a GPU host, the reduced one on a CPU.
STUDY ?= $(if $(shell command -v nvidia-smi 2>/dev/null),configs/seeds.yaml,configs/cpu-small.yaml)
study: $(STAMP)
	$(BIN)/python -m benchmarks.study $(STUDY) $(if $(CIFAR_ROOT),--data-dir $(CIFAR_ROOT),)

# `make gpu-check` on a GPU host: the demo's model trained and exported, TensorRT engines, ONNX Runtime CUDA
# parity, a bf16 step per backbone, the GPU bento load-tested → benchmarks/gpu-<gpu>.{json,md} (docs/gpu.md).
# It runs in its own venv with the `gpu` extra (never beside .venv's CPU ONNX Runtime); GPU_PYTHON=/path/to/python
# uses a prepared environment as it is. Without an NVIDIA driver it says so in one line and exits 0.
GPU_VENV ?= .venv-gpu
GPU_PY := $(or $(GPU_PYTHON),$(GPU_VENV)/bin/python)

$(GPU_VENV)/.installed: pyproject.toml
	test -x $(GPU_VENV)/bin/python || $(PY) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install -q --upgrade pip
	$(GPU_VENV)/bin/python -m pip install -q -e '.[gpu,dev]'
	touch $@

gpu-check:
	@command -v nvidia-smi >/dev/null 2>&1 \
		|| { echo "gpu-check: no NVIDIA driver here (nvidia-smi not found); nothing was checked"; exit 0; }; \
		$(MAKE) --no-print-directory _gpu-check

_gpu-check: $(if $(GPU_PYTHON),,$(GPU_VENV)/.installed)
	$(GPU_PY) -m training.train --config $(DEMO) --data-dir $(DATA_DIR)
	$(GPU_PY) -m export --config $(DEMO)
	$(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# `make soak`: SOAK_MINUTES of single images, batches and 5% bad uploads against the built bento (`make demo`
# builds it), on loopback, sampling the RSS of every serving process → benchmarks/soak.{json,md,png}.
SOAK_MINUTES ?= 10
soak: $(STAMP)
	$(BIN)/python -m benchmarks.soak --minutes $(SOAK_MINUTES)

# tests/test_ui.py drives Debian's chromium through chromium-driver: installed when missing if we are root
# (apt-get); otherwise, or offline, the test is skipped and says why.
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && apt-get update -q && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver; } || \
	echo "chromium or chromium-driver missing (installing needs root and apt-get): tests/test_ui.py will be skipped" >&2

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf runs artifacts reports studies .pytest_cache
