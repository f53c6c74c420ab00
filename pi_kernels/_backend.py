"""Which implementation of an op runs: the backend names, and the choice for a request and a device.

Every op has a Triton implementation and a plain-PyTorch one (:mod:`pi_kernels._torch_backend`); the rotary and
inference ops also have CUDA-extension kernels (:mod:`pi_kernels._cuda`). All take the same arguments, so an op
runs a backend by looking its launcher up by name.

``"auto"`` picks, for GPU tensors, the CUDA extension where the op has one and it is built, else Triton; for CPU
tensors, the torch backend, unless ``TRITON_INTERPRET=1`` is set (Triton's interpreter then runs the kernels on the
CPU, which is what the tests check).
"""

from . import _cuda
from .ops import _interpreting

__all__ = ["BACKENDS", "ALL_BACKENDS", "NO_CUDA", "resolve_backend"]

BACKENDS = ("auto", "triton", "cuda", "torch")
ALL_BACKENDS = ("triton", "cuda", "torch")
NO_CUDA = ("triton", "torch")  # ops without kernels in the CUDA extension


def resolve_backend(backend, device, implemented=ALL_BACKENDS):
    """The backend that runs (``"triton"``, ``"cuda"`` or ``"torch"``) for a requested one and the inputs' device.

    ``implemented`` lists the backends the op has; a request for another, or for one that cannot run on
    ``device``, raises with what to do instead.
    """
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
