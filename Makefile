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

.PHONY: install bench test lint gpu-check gpu-check-dry-run check-extension check-gpu-compile check-gpu-image \
	check-oldest check-newest check-triton-newest static-report check-vllm

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

# The declared range (setup.py, README "Versions"), one virtual environment per end, each made once and kept: a
# stamp file records what was asked for, and other pins make the environment anew. The tests run from this checkout
# (pi_kernels installed editable, without the CUDA build). Made from scratch on 2 cores, each takes a few minutes
# (torch's CUDA wheels are GBs); the times of each step are in the README.
#   GPU image: exactly what the H100/H200 machines hold (python3, no `python`); nothing can be installed there.
#   oldest:    the floors of setup.py.
#   newest:    the newest of each that setup.py allows (torch capped at 2.14.1 here, which pins Triton 3.8;
#              check-triton-newest below runs Triton 3.9).
TEST_TOOLS ?= pytest==9.0.3 hypothesis==6.155.2 matplotlib
GPU_IMAGE_VENV ?= /tmp/venv-gpu-image
GPU_IMAGE_PYTHON ?= 3.12
GPU_IMAGE_PINS ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0
OLDEST_VENV ?= /tmp/venv-oldest
OLDEST_PYTHON ?= 3.10
OLDEST_PINS ?= torch==2.8.0 triton==3.4.0 transformers==5.4.0
NEWEST_VENV ?= /tmp/venv-newest
NEWEST_PYTHON ?= 3.13
NEWEST_PINS ?= torch==2.14.1 "triton<3.10" "transformers<6"
RANGE_PYTEST = -m pytest -q -p no:cacheprovider -m "not static"
# The oldest and newest ends run the suite less what does not depend on these versions or is covered elsewhere, to
# keep CI within its time: the Hypothesis fuzzing of the same ops (test_properties.py), the GPU check's dry run (the
# GPU-image environment runs it), the nvcc build of csrc/ and the static report's PTX/SASS tools. Every module
# stays covered: the ops, torch.compile, parallel, the integrations, the recipe, the benchmarks' harness, the README.
RANGE_SUBSET = --ignore=tests/test_properties.py --ignore=tests/test_gpu_check.py --ignore=tests/test_csrc.py \
	--ignore=tests/test_static_report.py

# $(call range_venv,DIR,PYTHON VERSION,PACKAGES): DIR holds a virtual environment of that Python with PACKAGES, the
# test tools and this checkout; python<version> from PATH where it runs, else pyenv's.
define range_venv
	@if [ "$$(cat $(1)/.pins 2>/dev/null)" != '$(2) $(3) $(TEST_TOOLS)' ]; then \
		py=$$(python$(2) -c "" 2>/dev/null && echo python$(2) || \
			ls -d $${PYENV_ROOT:-$$HOME/.pyenv}/versions/$(2).*/bin/python$(2) 2>/dev/null | tail -n 1); \
		test -n "$$py" || { echo "no Python $(2) here (pyenv install $(2))"; exit 1; }; \
		echo "making $(1): Python $(2), $(3)"; \
		rm -rf $(1) && $$py -m venv $(1) && $(1)/bin/python -m pip install -q $(3) $(TEST_TOOLS) \
		&& echo '$(2) $(3) $(TEST_TOOLS)' > $(1)/.pins; \
	fi
	PI_KERNELS_SKIP_CUDA_BUILD=1 $(1)/bin/python -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
	@$(1)/bin/python -c "import sys, torch, triton, transformers; print('$(1): Python', sys.version.split()[0], \
		'torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
endef

# The GPU machine's versions: the whole suite, then the GPU check's dry run (the same stages as `make gpu-check`
# without a GPU), so that a GPU call finds nothing a CPU could have found.
check-gpu-image:
	$(call range_venv,$(GPU_IMAGE_VENV),$(GPU_IMAGE_PYTHON),$(GPU_IMAGE_PINS))
	$(GPU_IMAGE_VENV)/bin/python $(RANGE_PYTEST)
	$(MAKE) --no-print-directory gpu-check-dry-run PYTHON=$(GPU_IMAGE_VENV)/bin/python

check-oldest:
	$(call range_venv,$(OLDEST_VENV),$(OLDEST_PYTHON),$(OLDEST_PINS))
	$(OLDEST_VENV)/bin/python $(RANGE_PYTEST) $(RANGE_SUBSET)

check-newest:
	$(call range_venv,$(NEWEST_VENV),$(NEWEST_PYTHON),$(NEWEST_PINS))
	$(NEWEST_VENV)/bin/python $(RANGE_PYTEST) $(RANGE_SUBSET)

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
