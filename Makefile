# whale_dist — every target creates and reuses its own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: help venv demo test test-fast bench lint clean

help:
	@echo "make demo       run the whole pipeline on a synthetic survey (loopback S3, local Ray, CPU)"
	@echo "make test       the full test suite (slow tests included), as CI runs it"
	@echo "make test-fast  the tests without the slow marker"
	@echo "make bench      the benchmarks in bench/ (printed tables; see bench/RESULTS.md)"
	@echo "make lint       ruff"

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/whale-dist demo --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

bench: $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e ".[bench]"
	$(PY) bench/train_overhead.py
	$(PY) bench/embed_throughput.py
	$(PY) bench/index_bench.py
	$(PY) bench/lions_quality.py

lint: $(STAMP)
	$(VENV)/bin/ruff check whale_dist jobs tests bench

clean:
	rm -rf demo-output .pytest_cache
