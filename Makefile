# Both targets do all set-up on a fresh machine: a virtual environment, torch first (the CPU wheel here,
# the CUDA build on a machine that has one), then this package with its dev extras.
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0

.PHONY: install verify test bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

verify: install
	$(VENV)/bin/interp-cache verify --all

test: install
	$(PY) -m pytest -n 2 tests

bench: install
	$(PY) benchmarks/run.py

clean:
	rm -rf $(VENV) build *.egg-info
