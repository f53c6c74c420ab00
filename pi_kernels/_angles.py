"""The split of 2π that every angle reduction multiplies by: the Triton kernels' (``ops/_rope.py``, which explains
the angle math), the torch backend's (``_torch_backend.py``) and, as literals, the CUDA kernels'
(``csrc/include/rope_math.cuh``).

Ground floor: it imports nothing, so the plain-PyTorch backend reads these without importing Triton.
"""

__all__ = ["TWO_PI_HI", "TWO_PI_LO"]

# 2π = TWO_PI_HI + TWO_PI_LO with TWO_PI_HI exact in float32, so the constants mean the same whether Triton
# materializes them as float32 or float64.
TWO_PI_HI = 6.2831854820251465
TWO_PI_LO = -1.7484556025237907e-07
