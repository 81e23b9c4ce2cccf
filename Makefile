# Two commands on a fresh machine: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv demo test test-fast test-slow lint bench bench-gpu demo-model demo-cv table1 sample-data screenshots clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

## The bundled sample case + demo model through the real pipeline; outputs in ./ipmn-demo/
demo: venv
	$(BIN)/ipmn demo --out ipmn-demo

## Lint + the whole test suite (slow tests included; see `make test-fast`), in 2 worker processes
## (pytest-xdist), one per core; each test file stays on one worker, so module fixtures (a trained model) run once
test: venv lint
	$(BIN)/python -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

test-fast: venv lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: venv
	$(BIN)/python -m pytest -q -m slow $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check IPMNClassifier IPMNTrainer Testing

## Benchmarks (not part of make test): prints tables, writes bench-*.json
bench: venv
	$(BIN)/python Testing/Benchmarks/bench_predict.py --out bench-predict.json
	$(BIN)/python Testing/Benchmarks/bench_train.py --out bench-train.json
	$(BIN)/python Testing/Benchmarks/bench_memory.py --out bench-memory.json

## On a GPU machine: ViT-B/16 training samples/s + MFU (bf16/fp32, channels-last, compile), predict latency
bench-gpu: venv
	$(BIN)/python Testing/Benchmarks/bench_gpu.py --out bench-gpu.json
	$(BIN)/python Testing/Benchmarks/bench_train.py --device cuda --arch vit_base_patch16_224 --depth 12 --batch 32 --amp bf16 --skip-cv --out bench-train-gpu.json
	$(BIN)/python Testing/Benchmarks/bench_predict.py --device cuda --naive-runs 0 --out bench-predict-gpu.json

## Rebuild the shipped demo model (synthetic phantoms only; about 40 min on an idle 2-core CPU: phantoms 11, preprocessing 10.5, training ~18.5 (24 epochs); rerunning the train step reproduced every tensor bit for bit for an earlier model)
DEMO_COHORT := build/demo-cohort
demo-model: venv
	$(BIN)/ipmn phantoms --n 1200 --seed 21 --workers 2 --out $(DEMO_COHORT) --quiet
	IPMN_CACHE_DIR=build/cache $(BIN)/ipmn train --cohort $(DEMO_COHORT)/cohort.csv --config demo \
	  --out Resources/DemoModel --work-dir build/demo-train --device cpu --overwrite

## The demo preset's nested CV on 90 phantoms (3 outer x 2 inner folds, 15 epochs; ~15 min on 2 cores)
demo-cv: venv
	$(BIN)/ipmn phantoms --n 90 --seed 1 --out build/cv-cohort --quiet
	IPMN_CACHE_DIR=build/cache $(BIN)/ipmn cv --cohort build/cv-cohort/cohort.csv --config demo \
	  --out build/demo-cv --outer 3 --inner 2 --epochs 15 --device cpu --overwrite

## Table I on phantoms: nested CV of the demo ViT recipe vs CNN baselines (trained on the labels alone) on the
## same splits, 600 fresh phantoms, 3 outer x 2 inner folds. Meant for a GPU: on 2 CPU cores DenseNet121
## alone would take hours (README, Results)
TABLE1_MODELS := vit_tiny_patch16_224 resnet18 densenet121 mobilenetv2_100 alexnet smallcnn
table1: venv
	$(BIN)/ipmn phantoms --n 600 --seed 3 --workers 2 --out build/table1-cohort --quiet
	IPMN_CACHE_DIR=build/cache $(BIN)/ipmn cv --cohort build/table1-cohort/cohort.csv --config demo \
	  --models $(TABLE1_MODELS) --outer 3 --inner 2 --device auto --overwrite --out build/table1

## Rebuild the bundled sample case (Resources/SampleData)
sample-data: venv
	$(BIN)/python Resources/scripts/make_sample.py Resources/SampleData

## The sample case's result as Slicer's slice views compose it (slicer-core, no Slicer app) -> Resources/Screenshots/
screenshots: venv
	$(BIN)/python Resources/scripts/make_screenshots.py

clean:
	rm -rf ipmn-demo .pytest_cache build
