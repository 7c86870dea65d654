# Everything a fresh machine needs: `make console` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
STAMP := $(VENV)/.batchdeck-installed

.PHONY: install console test bench-scheduler clean

# torch goes in first, pinned, so the project's looser `torch>=` range installs nothing more;
# TORCH_INDEX=https://download.pytorch.org/whl/cpu takes the small CPU build where pip would fetch CUDA's.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

console: $(STAMP)
	$(VENV)/bin/batchdeck console

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider

bench-scheduler: $(STAMP)
	$(PY) benchmarks/scheduler_bench.py

clean:
	rm -rf $(VENV) build *.egg-info
