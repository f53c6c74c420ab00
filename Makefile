# The two commands of the README. `make test` is what CI runs (.ci/run).
PYTHON ?= python

.PHONY: install bench test lint

install:
	$(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation -e .

# GPU: the full rotary benchmark (tables, CSV and PNG under benchmarks/results/<gpu>/).
# No GPU: a quick parity + timing run under Triton's interpreter, which says so.
bench:
	$(PYTHON) -m benchmarks.bench_rotary

lint:
	ruff check .

test: lint
	$(PYTHON) -m pytest -q
