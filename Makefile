# dgpo-trl. `make demo` and `make test` set up what they need (a venv in .venv) on a fresh machine, offline apart
# from the package registries. CPU installs take the CPU torch wheel; on a GPU machine: make install TORCH_SPEC=torch
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
# DeepSpeed JIT-compiles one op at its first distributed start (~90 s); cache it inside the tree, once
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-fast demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Triton runs the fused kernel's parity test in its interpreter on CPU; GPU torch builds ship their own Triton
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install --quiet triton
	touch $@

install: $(VENV)/.installed

test: install
	$(PY) -m pytest -q tests

test-fast: install
	$(PY) -m pytest -q tests -m "not slow"

demo: install
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
