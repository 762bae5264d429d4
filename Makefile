# Everyday commands. On a fresh machine (only Python 3 needed) `make quickstart` and `make test` each set up what
# they need first: a virtual environment in .venv with the pinned CPU torch and the package (made once, remade only
# when pyproject.toml changes). `make install` is for those who manage their own environment instead.
PYTHON ?= python
VENV := .venv
VENV_PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: venv install sample-data quickstart test test-fast lint format

# torch first, pinned to the CPU wheel (an unpinned torch pulls several GB of CUDA), then the package and its extras
# for tests, ONNX export and serving.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(VENV_PYTHON) -m pip install -q --upgrade pip
	$(VENV_PYTHON) -m pip install -q torch==2.13.0
	$(VENV_PYTHON) -m pip install -q -e ".[dev]"
	touch $(STAMP)

venv: $(STAMP)  ## the virtual environment .venv (activate it with `. .venv/bin/activate`)

install:  ## into the current python (your own environment): the same pinned torch, then the package
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[dev]"

sample-data: $(STAMP)  ## generated abstracts + a tokenizer trained on them, for the offline quickstart
	$(VENV_PYTHON) scripts/make_sample_data.py --out data/sample

quickstart: sample-data  ## trains the small offline model end to end (about a minute on 2 CPU cores)
	HF_HUB_OFFLINE=1 $(VENV_PYTHON) -m lightning_cls fit --config configs/quickstart.yaml

test: $(STAMP)  ## the whole suite, slow tests (DDP, every config) included
	HF_HUB_OFFLINE=1 $(VENV_PYTHON) -m pytest

test-fast: $(STAMP)  ## skips the tests marked slow
	HF_HUB_OFFLINE=1 $(VENV_PYTHON) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .
