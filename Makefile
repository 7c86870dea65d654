# Everything a fresh machine needs: `make console` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.batchdeck-installed

.PHONY: install console test bench-scheduler clean

# torch goes in first, pinned, so the project's looser `torch>=` range installs nothing more
# (on a machine without CUDA the pinned wheel is the small CPU build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==$(TORCH_VERSION)"
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
