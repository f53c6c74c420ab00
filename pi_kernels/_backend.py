"""Which implementation of an op runs: the backend names, and the choice for a request and a device.

Every op has a Triton implementation and a plain-PyTorch one (:mod:`pi_kernels._torch_backend`); the rotary and
inference ops also have CUDA-extension kernels (:mod:`pi_kernels._cuda`). All take the same arguments, so an op
runs a backend by looking its launcher up by name, in the op's ``LAUNCHERS`` table: the keys of that table are the
one statement of which backends the op has, and :func:`resolve_backend` reads them.

``"auto"`` picks, for GPU tensors, the CUDA extension where the op has one and it is built, else Triton; for CPU
tensors, the torch backend, unless ``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the kernels on the
CPU, which is what the tests check).
"""

import os

from . import _cuda

__all__ = ["BACKENDS", "resolve_backend"]

BACKENDS = ("auto", "triton", "cuda", "torch")


def _interpreting():
    """Whether Triton kernels run under its interpreter (``TRITON_INTERPRET=1``, a machine without a GPU).

    The ops import this function by name (their GPU or interpreter branches); :func:`resolve_backend` reads it
    through this module, so ``tests/gpu_compile_check.py`` can replace it here alone to make the backend choice
    Triton's for CPU tensors while the ops keep their GPU branches.
    """
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend, device, launchers):
    """The backend that runs (``"triton"``, ``"cuda"`` or ``"torch"``) for a requested one and the inputs' device.

    ``launchers`` is the op's launcher table (``LAUNCHERS``), keyed by the backends it has; a request for another,
    or for one that cannot run on ``device``, raises with what to do instead.
    """
    implemented = tuple(launchers)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "triton" if _interpreting() else "torch"
        return "cuda" if "cuda" in implemented and _cuda.available() else "triton"
    if backend not in implemented:
        raise ValueError(f"backend={backend!r} is not available for this op; use one of {('auto', *implemented)}")
    if backend == "cuda":
        _cuda.require()
        if device.type != "cuda":
            raise ValueError(f"backend='cuda' needs tensors on a CUDA device, got {device}")
    if backend == "triton" and device.type != "cuda" and not _interpreting():
        raise RuntimeError(f"backend='triton' needs tensors on a GPU, got tensors on {device}; for CPU tensors use "
                           f"backend='torch' (or 'auto'), or set TRITON_INTERPRET=1 before importing triton to run "
                           f"the Triton kernels in its (slow) interpreter")
    return backend
