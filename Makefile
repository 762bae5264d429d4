# Everyday commands. `make install` once, then `make quickstart` and `make test`.
PYTHON ?= python

.PHONY: install sample-data quickstart test test-fast lint format

install:  ## torch first, pinned to the CPU wheel here (an unpinned torch pulls CUDA), then the package
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

sample-data:  ## generated abstracts + a tokenizer trained on them, for the offline quickstart
	$(PYTHON) scripts/make_sample_data.py --out data/sample

quickstart: sample-data  ## trains the small offline model end to end (about a minute on 2 CPU cores)
	$(PYTHON) -m lightning_cls fit --config configs/quickstart.yaml

test:  ## the whole suite, slow tests (DDP, every config) included
	$(PYTHON) -m pytest

test-fast:  ## skips the tests marked slow
	$(PYTHON) -m pytest -m "not slow"

lint:
	ruff check . && ruff format --check .

format:
	ruff check --fix . && ruff format .
