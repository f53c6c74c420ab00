"""Test setup: Triton's interpreter on machines without a GPU, and the device every test runs on.

``TRITON_INTERPRET`` must be set before triton is imported, so it is set here, at collection start, unless a CUDA
device is present (then the same tests run compiled on the GPU). ``PI_KERNELS_TEST_DEVICE=cpu`` forces the
interpreter on a GPU machine too.
"""

import os
import shutil
import subprocess


def _has_cuda_device():
    # Asking torch would initialize CUDA at collection time; nvidia-smi answers without touching the GPU state.
    if os.environ.get("PI_KERNELS_TEST_DEVICE") == "cpu":
        return False
    if os.environ.get("PI_KERNELS_TEST_DEVICE") == "cuda":
        return True
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    return subprocess.run([smi, "-L"], capture_output=True).returncode == 0


if not _has_cuda_device():
    os.environ["TRITON_INTERPRET"] = "1"
# Tests check results, not tile choices: ops that autotune (qkv_proj) keep one config, so no test runs for minutes.
os.environ.setdefault("PI_KERNELS_AUTOTUNE", "0")
# Inductor compiles in this process: its pool of compile workers buys nothing for the tiny graphs of
# tests/test_compile.py, and on a loaded 2-core machine its shutdown at exit has outlasted its 300 s timeout.
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


@pytest.fixture
def device():
    """The device under test: ``cuda`` on a GPU machine, ``cpu`` (Triton interpreter) elsewhere."""
    return torch.device(DEVICE)
