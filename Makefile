# Everyday commands. `make install` is idempotent: quick when nothing changed.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
DEBIAN_DEPS := pkg-config libturbojpeg0-dev libopencv-dev curl
PYTEST_ARGS ?= -m "not slow"
# Tests run in parallel, one file per worker (pytest-xdist --dist loadfile: a module's fixtures are built once).
# Two workers with one torch thread each keep a 2-core machine busy without oversubscribing it; PYTEST_WORKERS=0
# runs serially.
PYTEST_WORKERS ?= 2
export OMP_NUM_THREADS ?= 1

.PHONY: help install test test-all test-under-load lint bench demo clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install this checkout (editable) with every extra; quick when nothing changed

$(STAMP): pyproject.toml Makefile
	@# FFCV builds from source and needs these Debian packages; webdataset reads http(s) shards with curl
	@# (installed only when missing and we are root).
	@missing=$$(for p in $(DEBIAN_DEPS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then echo "apt-get install $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "Missing Debian packages (FFCV, curl): $$missing (run as root or: sudo apt-get install $$missing)"; exit 1; fi; \
	fi
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	@# torch from the local wheels first; ffcv is built against the installed numpy (no build isolation).
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q numpy cython pkgconfig
	$(BIN)/pip install -q --no-build-isolation -e ".[ffcv,sklearn,launch,dev,detect]"
	@touch $(STAMP)

test: install ## the fast tests (PYTEST_ARGS=... to choose)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

test-all: ## the fast and the slow (end-to-end) tests, as CI runs them
	$(MAKE) test PYTEST_ARGS="-m 'slow or not slow'"

test-under-load: install ## the tests that signal, kill or race processes, 3x beside a CPU hog (RUNS=, HOGS=)
	bash scripts/tests_under_load.sh

lint: install ## ruff
	$(BIN)/ruff check focalnet data scripts tests train.py eval.py

bench: install ## the model, training-loop and data benchmarks (tables with ratios against baselines)
	$(BIN)/python scripts/bench_model.py
	$(BIN)/python scripts/bench_train.py
	$(BIN)/python scripts/bench_data.py
	$(BIN)/python scripts/bench_pixels.py
	$(BIN)/python scripts/bench_transfer.py
	$(BIN)/python scripts/bench_detectors.py

demo: install ## train FocalNet-Micro on handwritten digits on the CPU (a few minutes)
	$(BIN)/python scripts/demo.py $(DEMO_ARGS)

clean: ## remove outputs/, multirun/ and caches
	rm -rf outputs multirun .pytest_cache
