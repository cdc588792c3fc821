# One command each on a fresh machine: `make test`, `make run`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
OUT     ?= ./nat4
SAMPLE  ?= ./sample

.PHONY: install test lint run bench profile clean readme

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# Optional tensor back-ends for the DLPack tests: torch 2.13.0 is a CPU wheel on these
	# machines; any other torch spec pulls a multi-GB CUDA build. Not required by nat4etl.
	$(BIN)/python -m pip install torch==2.13.0 || echo "warning: torch not installed; DLPack tests will be skipped"
	$(BIN)/python -m pip install jax || echo "warning: jax not installed; JAX tests will be skipped"
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check nat4etl tests bench
	$(BIN)/ruff format --check nat4etl tests bench

run: install
	$(BIN)/nat4etl sample --out $(SAMPLE) --scale mini
	$(BIN)/nat4etl build --area all --source $(SAMPLE) --out $(OUT)

bench: install
	$(BIN)/python bench/run.py

profile: install
	$(BIN)/python bench/profile.py

readme: install
	$(BIN)/python -m nat4etl.schema README.md

clean:
	rm -rf $(VENV) $(SAMPLE) $(OUT) .pytest_cache .ruff_cache build *.egg-info
