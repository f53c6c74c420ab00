"""pi_kernels: fused GPU kernels for RoPE models extended by Position Interpolation (arXiv 2306.15595).

Public API
----------
rotary_interp, RotaryInterp
    Interpolated RoPE on q and k in one launch (Triton, or the CUDA extension when built), forward and backward.
rotary_kv_cache_append, rotary_paged_kv_cache_append, inference
    Inference: rotary fused with the KV-cache append (contiguous or paged cache); vLLM's in-place rotary
    convention in :mod:`pi_kernels.inference`.
attention_rotary, AttentionRotary
    Softmax attention of un-rotated q and k with interpolated RoPE (Triton: a rotation pass, then flash
    attention), forward, backward and decode against a rotated KV cache.
parallel
    Context parallelism: a sequence sharded across the ranks of a torch.distributed group, with its positions and
    attention over the whole sequence.
set_value_checks
    Switch off the synchronizing checks on tensor values (positions ≥ 0, ``cu_seqlens``).
"""

from . import inference, parallel, reference, scaling
from ._validation import set_value_checks
from .inference import rotary_kv_cache_append, rotary_paged_kv_cache_append
from .ops.attention import AttentionRotary, attention_rotary
from .ops.qkv_proj import QKVProjRotary, qkv_proj_rotary
from .ops.rotary import RotaryInterp, rotary_interp
from .scaling import extend_context

__all__ = ["AttentionRotary", "QKVProjRotary", "RotaryInterp", "attention_rotary", "extend_context", "inference",
           "parallel", "qkv_proj_rotary", "reference",
           "rotary_interp", "rotary_kv_cache_append", "rotary_paged_kv_cache_append", "scaling", "set_value_checks"]
__version__ = "0.1.0"
