"""Every Triton kernel compiles for sm_90 (H100) and sm_80 (A100), without a GPU, within shared memory and spills.

The rest of the suite runs the kernels under Triton's interpreter, which never compiles them, so errors of a real
compile (a non-constexpr global read in a kernel, an op the backend refuses, shared memory past the device's limit)
would first show on a GPU. ``tests/gpu_compile_check.py`` compiles them with the ptxas of the triton wheel; see its
docstring. It runs in a subprocess: conftest.py has set TRITON_INTERPRET in this process, and triton, once imported
in interpreter mode, stays there.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).with_name("gpu_compile_check.py")
NVIDIA_BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
MISSING = [tool for tool in ("ptxas", "cuobjdump") if not (NVIDIA_BIN / tool).exists()]


@pytest.mark.skipif(bool(MISSING), reason=f"the triton wheel has no {' or '.join(MISSING)} under {NVIDIA_BIN}, so "
                                          "kernels cannot be compiled for NVIDIA targets here")
def test_every_kernel_compiles_for_sm90_and_sm80(tmp_path):
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    # A fresh cache, so every kernel is really compiled (the script also uses one of its own).
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "80"], cwd=SCRIPT.parent.parent, env=env,
                          capture_output=True, text=True, timeout=1200)
    report = proc.stdout + proc.stderr
    print(report)  # the table of registers, spills and shared memory, shown by pytest -s or on failure
    failures = report[report.find("FAILURE(S):"):] if "FAILURE(S):" in report else report[-6000:]
    assert proc.returncode == 0, f"gpu_compile_check.py exited with {proc.returncode}:\n{failures}"
