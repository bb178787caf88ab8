# Two entry points that do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch where there is no GPU: a plain `pip install torch` pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PIP_LOCAL := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)
PYTEST_ARGS ?=

.PHONY: setup test demo clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "GPU found: installing the default torch build"; $(PY) -m pip install "torch>=2.4"; \
	else \
		echo "No GPU: installing the CPU build $(TORCH_SPEC)"; \
		$(PY) -m pip install $(PIP_LOCAL) "$(TORCH_SPEC)" || \
		$(PY) -m pip install --index-url https://download.pytorch.org/whl/cpu "$(TORCH_SPEC)"; \
	fi
	$(PY) -m pip install $(PIP_LOCAL) -e ".[test]"
	touch $@

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(VENV)/bin/bimode demo

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
