"""pi_kernels: fused GPU kernels for RoPE models extended by Position Interpolation (arXiv 2306.15595).

Public API
----------
rotary_interp, RotaryInterp
    Interpolated RoPE on q and k in one Triton launch, forward and backward.
set_value_checks
    Switch off the synchronizing checks on tensor values (positions ≥ 0, ``cu_seqlens``).
"""

from . import reference, scaling
from ._validation import set_value_checks
from .ops.qkv_proj import QKVProjRotary, qkv_proj_rotary
from .ops.rotary import RotaryInterp, rotary_interp
from .scaling import extend_context

__all__ = ["QKVProjRotary", "RotaryInterp", "extend_context", "qkv_proj_rotary", "reference", "rotary_interp",
           "scaling", "set_value_checks"]
__version__ = "0.1.0"
