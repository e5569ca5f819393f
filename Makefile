# shoprec: two commands.
#   make demo   set up .venv (locked set), run the pipeline on a synthetic shop, serve it
#   make test   set up .venv (locked set), run the tests tier by tier (fast, integration,
#               operations), stopping at the first tier that fails
# and, while working: make test-fast (the fast tier alone, about 2 minutes).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export SHOPREC_HOME ?= $(CURDIR)/state
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-fast test-integration test-operations lint lock bench bench-push \
	bench-serving bench-scale bench-scale-small bench-gpu clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade "pip>=24" wheel
	# Exactly the locked set; torch==2.13.0 resolves to the CPU wheel (see constraints.txt).
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[cpu,dev]"
	@touch $@

demo: $(STAMP)
	$(BIN)/shoprec demo

# Tiers in order, each on $(SHOPREC_TEST_WORKERS) pytest-xdist workers (default 2; 1 = one
# process); PYTEST_ARGS go to every pytest run (e.g. PYTEST_ARGS='-k serving').
test: $(STAMP)
	$(BIN)/python tests/run_tiers.py -- $(PYTEST_ARGS)

test-fast test-integration test-operations: $(STAMP)
	$(BIN)/python tests/run_tiers.py $(@:test-%=%) -- $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

# Re-resolve the dependency set and rewrite constraints.txt (review the diff before committing).
lock:
	rm -rf /tmp/shoprec-lock && $(PYTHON) -m venv /tmp/shoprec-lock
	/tmp/shoprec-lock/bin/python -m pip install -q --upgrade pip
	/tmp/shoprec-lock/bin/python -m pip install -q ".[cpu,dev]"
	{ sed -n '1,4p' constraints.txt; /tmp/shoprec-lock/bin/python -m pip freeze --exclude shoprec \
	  | sed 's/^torch==\([0-9.]*\)+cpu$$/torch==\1/'; } > constraints.txt.new && mv constraints.txt.new constraints.txt

bench: $(STAMP)
	$(BIN)/python benchmarks/materialize.py

# Real-time ingest latency (POST /events' path), local profile; PUSH_ARGS="--profile prod".
PUSH_ARGS ?=
bench-push: $(STAMP)
	$(BIN)/python benchmarks/realtime_push.py $(PUSH_ARGS)

# Serving latency/throughput on a 100k-product shop (BENCH_ARGS="--products 2000 --users 1000
# --seconds 3" for a smoke run). Builds its shop once under state/bench-serving. The setup's
# evaluation step (every baseline over 100k products) is skipped by default: it is the
# pipeline's cost, not serving's. The server limits its own threads (SHOPREC_SERVING_THREADS).
BENCH_ARGS ?= --skip-evaluate --encoder minilm --seconds 30
bench-serving: $(STAMP)
	$(BIN)/python benchmarks/serving.py $(BENCH_ARGS)

# The pipeline at scale: generate a shop, load its history by data-only DAG runs, run one day
# with training and print each task's wall time, CPU time and peak RSS. Full: 100,000 products,
# 1,000,000 users, 180 days of ~200,000 events (hours); small: minutes, the README's figures.
# SCALE_ARGS go to both (e.g. SCALE_ARGS="--days 10 --home /tmp/scale").
SCALE_ARGS ?=
bench-scale: $(STAMP)
	$(BIN)/python benchmarks/scale.py --preset full $(SCALE_ARGS)

bench-scale-small: $(STAMP)
	$(BIN)/python benchmarks/scale.py --preset small $(SCALE_ARGS)

# Accelerator throughput: catalogue encoding (tokenizer included), fine-tuning pairs/s, FAISS
# build and search; on the GPU when there is one (GPU_ARGS="--titles 20000" for a quick run).
GPU_ARGS ?=
bench-gpu: $(STAMP)
	$(BIN)/python benchmarks/gpu.py $(GPU_ARGS)

clean:
	rm -rf state
