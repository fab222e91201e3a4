# Two commands for a fresh machine with Python 3.11: `make demo` (run it) and `make test` (test it).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install demo test test-slow test-chaos test-wheel bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=23"
	# a CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/tgastream demo $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(ARGS)

# fault injection over the whole pipeline (tests/system): prints the fault schedule, the verdict
# (ALL-RECORDS-DELIVERED or what is missing/extra) and a JSON summary (ARGS="--chaos-json PATH")
test-chaos: $(STAMP)
	$(PY) -m pytest -m slow tests/system $(ARGS)

# the built wheel in a fresh virtualenv, outside the checkout: doctor --require-fused + a small demo
test-wheel:
	.ci/wheel-check

# every device figure from one run on a lent GPU (bench model, trainer, freshness with --device cuda),
# JSON into one folder: OUT=bench-gpu by default (bench/gpu.sh; under 8 minutes)
bench-gpu: $(STAMP)
	bench/gpu.sh $(or $(OUT),bench-gpu)

clean:
	rm -rf $(VENV) .pytest_cache tgastream-data
