# The two commands of the README. `make test` is what CI runs (.ci/run).
# `python`, else `python3` (the GPU machine's image has only the latter).
PYTHON ?= $(shell command -v python >/dev/null 2>&1 && echo python || echo python3)
# Where `make check-extension` keeps a CUDA build of torch (never the global python's: it would replace its torch).
CUDA_VENV ?= /tmp/venv-cuda
CUDA_TORCH ?= torch==2.14.1

# A CUDA build of torch already installed (a GPU machine) is kept, and nothing is fetched there.
HAVE_CUDA_TORCH := $(shell $(PYTHON) -c "import sys, torch; sys.exit(torch.version.cuda is None)" 2>/dev/null && echo yes)
# On a GPU machine with pytest-xdist the tests run in parallel: Triton's compiles dominate, one worker per core.
PYTEST_PARALLEL := $(shell nvidia-smi -L >/dev/null 2>&1 && $(PYTHON) -c "import xdist" 2>/dev/null && echo "-n auto")

.PHONY: install bench test lint gpu-check gpu-check-dry-run check-extension check-gpu-compile check-triton-newest \
	static-report check-vllm

install:
ifeq ($(HAVE_CUDA_TORCH),yes)
	# CUDA torch present: no network, no dependency resolution; the extension is built for this GPU only.
	TORCH_CUDA_ARCH_LIST="$${TORCH_CUDA_ARCH_LIST:-$$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)}" \
		$(PYTHON) -m pip install --no-index --no-deps --no-build-isolation -e .
else
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -r requirements-dev.txt
	$(PYTHON) -m pip install --no-build-isolation -e .
endif

# GPU: the full rotary benchmark (tables, CSV and PNG under benchmarks/results/<gpu>/).
# No GPU: the torch backend against eager baselines on one thread, then the Triton kernels' parity (not timed) under
# the interpreter.
bench:
	$(PYTHON) -m benchmarks.bench_rotary

lint:
	@if $(PYTHON) -m ruff --version >/dev/null 2>&1; then $(PYTHON) -m ruff check .; \
	else echo "ruff is not installed here (a GPU machine's image): lint skipped"; fi

# The sm_90/sm_80 compile of every kernel and the budgets of its machine code (tests marked `static`:
# tests/test_gpu_compile.py, tests/test_attention_budgets.py; minutes on 2 cores, issues 11 and 12) are their own CI
# step after the tests, so that `make test` stays under ~10 minutes.
test: lint
	$(PYTHON) -m pytest -q $(PYTEST_PARALLEL) -m "not static"

check-gpu-compile:
	$(PYTHON) -m pytest -q -m static

# Regenerates benchmarks/results/static/sm90.md and sm80.md (no GPU needed).
static-report:
	$(PYTHON) -m benchmarks.static_report --arch 90 80 --out benchmarks/results/static

# One command of GPU truth (build, GPU tests, sanitizers, every benchmark) in at most 9 minutes; see README.
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check

# The same stages without a GPU (interpreter, tiny shapes, no build, no sanitizer), into a temporary folder.
gpu-check-dry-run:
	$(PYTHON) -m benchmarks.gpu_check --dry-run --out "$$(mktemp -d)"

# The real CUDA extension against a CUDA build of torch, on a machine without a GPU: build for sm_80 and sm_90,
# load, and check every op's schema against pi_kernels/_cuda.py's calls (tests/extension_check.py).
check-extension:
	test -x $(CUDA_VENV)/bin/python || $(PYTHON) -m venv $(CUDA_VENV)
	$(CUDA_VENV)/bin/python -c "import sys, torch, numpy; sys.exit(torch.version.cuda is None)" 2>/dev/null \
		|| $(CUDA_VENV)/bin/python -m pip install -q $(CUDA_TORCH) numpy
	$(CUDA_VENV)/bin/python tests/extension_check.py

# Triton 3.9, the newest setup.py allows (what a fresh `pip install .` on a CPU machine picks; newer than any torch
# pins yet), in a virtual environment layered on this one: every kernel's float32 cases under its interpreter
# (rotary, inference, attention, qkv_proj) and the torch backend beside them; a few minutes on 2 cores. The static
# report compiles under it too: `$(TRITON_NEWEST_VENV)/bin/python -m benchmarks.static_report`.
TRITON_NEWEST ?= triton==3.9.0
TRITON_NEWEST_VENV ?= /tmp/venv-triton-newest
check-triton-newest:
	test -x $(TRITON_NEWEST_VENV)/bin/python || $(PYTHON) -m venv --system-site-packages $(TRITON_NEWEST_VENV)
	$(TRITON_NEWEST_VENV)/bin/python -m pip install -q --no-deps $(TRITON_NEWEST)
	$(TRITON_NEWEST_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_rotary.py tests/test_inference.py \
		tests/test_attention.py tests/test_qkv_proj.py tests/test_torch_backend.py \
		-k "not compile and (dtype0 or float32 or not dtype)"

# vLLM in a virtual environment of its own (it brings its own CUDA torch 2.14.0, Triton and transformers: ~9.5 GB,
# built once in ~4 minutes here): the vLLM plugin against vLLM's rotary classes on CPU tensors
# (tests/test_integrations_vllm.py, the README's vLLM block included; ~1 minute).
VLLM ?= vllm==0.33.0
VLLM_VENV ?= /tmp/venv-vllm
check-vllm:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -c "import vllm, pytest" 2>/dev/null \
		|| $(VLLM_VENV)/bin/python -m pip install -q $(VLLM) pytest==9.0.3
	PI_KERNELS_SKIP_CUDA_BUILD=1 $(VLLM_VENV)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_integrations_vllm.py
