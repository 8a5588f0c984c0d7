# v2m: two commands set everything up on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(abspath $(VENV))/bin
STAMP := $(VENV)/.installed-stamp
PTLFLOW := ptlflow==0.4.2
PYTEST_ARGS ?=
BENCH_ARGS ?=

# The venv's tools (v2m, dvc, pytest) come first on PATH; DVC sends no usage analytics.
export PATH := $(BIN):$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: help venv demo seeds test test-all lint bench clean-data

help:
	@echo "make demo      create .venv, run the whole pipeline on the embedded SynthV2M profile (dvc repro)"
	@echo "make seeds     after make demo: the seed study, both systems over seed_study.seeds (reports/seeds.md, ~25 min)"
	@echo "make test      create/update .venv and run the test suite (slow end-to-end tests excluded)"
	@echo "make test-all  the whole suite, slow tests included"
	@echo "make lint      ruff"
	@echo "make bench     every benchmarks/*.py, then the summary in benchmarks/README.md (~30 min on 2 cores)"

# The venv is (re)built when pyproject.toml or this Makefile changes.
$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m pip install --quiet --no-deps $(PTLFLOW)
	@touch $@

venv: $(STAMP)

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

test: venv
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

test-all: venv
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check pipeline tests benchmarks scripts

bench: venv
	$(BIN)/python benchmarks/run_all.py $(BENCH_ARGS)

clean-data:
	rm -rf data/raw data/ingest data/downloads reports/synth_preview.png data/manifests/synth.csv
