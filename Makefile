# Two commands for a fresh machine with Python 3.11: `make demo` (run it) and `make test` (test it).
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
STAMP := $(VENV)/.installed

.PHONY: install demo test screenshot test-slow test-chaos test-wheel bench-gpu docs docs-ref docs-serve clean

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

# parallel workers: most tests wait on real processes (broker, worker, trainer), not on the CPU;
# each worker starts its own broker. One test at a time per worker, in collection order, which puts
# the longest end-to-end files first (tests/conftest.py). WORKERS=0 runs them one after another.
WORKERS ?= 2
test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist load --maxschedchunk 1 $(ARGS)

# the live page's screenshot in docs/img/ui.png, from the browser test against a running demo
screenshot: $(STAMP)
	UPDATE_UI_SCREENSHOT=1 $(PY) -m pytest tests/test_ui_browser.py -k live_page $(ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -m slow $(ARGS)

# fault injection over the whole pipeline (tests/system): prints the fault schedule, the verdict
# (ALL-RECORDS-DELIVERED or what is missing/extra) and a JSON summary (ARGS="--chaos-json PATH")
test-chaos: $(STAMP)
	$(PY) -m pytest -m slow tests/system $(ARGS)

# the built wheel in a fresh virtualenv, outside the checkout: doctor --require-fused + a small demo
test-wheel:
	.ci/wheel-check

# the documentation site (mkdocs.yml, docs/) into site/: fails on a broken link or a page left out of the nav
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict

# rewrite the generated reference pages (settings, metrics, alerts, OpenAPI) from the code
docs-ref: $(STAMP)
	$(PY) -m tgastream.stream.docgen

docs-serve: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs serve

# every device figure from one run on a lent GPU (bench model, trainer, freshness with --device cuda),
# JSON into one folder: OUT=bench-gpu by default (bench/gpu.sh; under 8 minutes)
bench-gpu: $(STAMP)
	bench/gpu.sh $(or $(OUT),bench-gpu)

clean:
	rm -rf $(VENV) .pytest_cache tgastream-data site
